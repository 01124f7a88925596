"""The wire: every Redis key, channel, queue, task and frame, defined once, with no I/O.

Both the async API and the sync/async worker import this module; no other module spells
a Redis name. Everything on the wire is JSON (never pickle).

Frames travel on a job's reply channel as ``<json header>\\n<body bytes>``: the header is
small JSON, the body is Ollama's bytes untouched (complete NDJSON lines or SSE events), so
relaying them costs no re-encoding.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

__all__ = [
    "CANCEL_ALL",
    "CANCEL_CHANNEL",
    "TASK_NAME",
    "WORKERS_INDEX",
    "Frame",
    "FrameKind",
    "Job",
    "ProtocolError",
    "WorkerEntry",
    "cancel_key",
    "celery_message",
    "decode_frame",
    "encode_frame",
    "job_channel",
    "job_channel_pattern",
    "job_id_from_channel",
    "model_queue",
    "new_id",
    "worker_key",
    "worker_queue",
]

PREFIX = "oshepherd"
TASK_NAME = "oshepherd.run_job"
WORKERS_INDEX = f"{PREFIX}:workers"  # zset: worker id -> expiry (epoch s); readers never SCAN
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # one channel; the message is the job id

FrameKind = Literal["start", "head", "data", "end", "error", "ping"]


class ProtocolError(ValueError):
    """A frame or job that does not follow the wire format."""


def new_id() -> str:
    return uuid.uuid4().hex


def model_queue(model: str) -> str:
    """Queue of jobs any worker holding ``model`` (normalized) may take.

    Names contain ':' and '/', which is why kombu's ``sep`` must never be ':'.
    """
    return f"{PREFIX}.model.{model}"


def worker_queue(worker_id: str) -> str:
    """Queue of jobs aimed at one worker (model management on its host)."""
    return f"{PREFIX}.worker.{worker_id}"


def worker_key(worker_id: str) -> str:
    """Registry entry of one worker (JSON string with a TTL)."""
    return f"{PREFIX}:worker:{worker_id}"


def cancel_key(job_id: str) -> str:
    """The first attempt of a job still allowed to start (``CANCEL_ALL``: none)."""
    return f"{PREFIX}:cancel:{job_id}"


CANCEL_ALL = 1 << 30


def job_channel(api_id: str, job_id: str) -> str:
    """Reply channel of a job. One pattern subscription per API process covers them all."""
    return f"{PREFIX}:job:{api_id}:{job_id}"


def job_channel_pattern(api_id: str) -> str:
    return f"{PREFIX}:job:{api_id}:*"


def job_id_from_channel(channel: str) -> str:
    return channel.rpartition(":")[2]


@dataclass(slots=True)
class Job:
    """One request for one Ollama host: the Celery task's single argument.

    ``body`` is the client's JSON text, forwarded to Ollama byte for byte; ``model`` is the
    normalized name, used for routing only.
    """

    id: str
    channel: str
    method: str
    path: str
    body: str
    model: str
    deadline: float
    attempt: int = 0
    queue: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel": self.channel,
            "method": self.method,
            "path": self.path,
            "body": self.body,
            "model": self.model,
            "deadline": self.deadline,
            "attempt": self.attempt,
            "queue": self.queue,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ProtocolError(f"malformed job: {exc}") from exc

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.deadline


def celery_message(job: Job) -> bytes:
    """The kombu/Celery (task protocol 2) envelope for ``job``, ready to LPUSH on its queue.

    Publishing it natively from asyncio costs one Redis command; ``apply_async`` is
    synchronous and several times slower. The body is plain JSON (no base64), which
    kombu accepts when ``body_encoding`` is absent. ``argsrepr`` names only the job id so
    worker logs never carry prompts.
    """
    body = orjson.dumps(
        [[job.to_dict()], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    envelope = {
        "body": body.decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_NAME,
            "id": job.id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": job.id,
            "parent_id": None,
            "argsrepr": f"[job {job.id}]",
            "kwargsrepr": "{}",
            "origin": "oshepherd-api",
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": job.id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": job.queue},
            "priority": 0,
            "delivery_tag": new_id(),
        },
    }
    return orjson.dumps(envelope)


@dataclass(slots=True)
class Frame:
    """One message on a job's reply channel.

    ``start {worker}`` a worker claimed the job · ``head {status, content_type, last}``
    Ollama answered (``last``: the body is complete) · ``data`` more complete lines ·
    ``end`` the response is complete · ``error {status, error, retry}`` the attempt failed ·
    ``ping`` keep-alive while Ollama is silent. ``seq`` counts from 0 within an attempt.
    """

    kind: FrameKind
    seq: int
    attempt: int = 0
    body: bytes = b""
    meta: dict[str, Any] = field(default_factory=dict)


def encode_frame(frame: Frame) -> bytes:
    header = {"k": frame.kind, "s": frame.seq, "a": frame.attempt, **frame.meta}
    return orjson.dumps(header) + b"\n" + frame.body


def decode_frame(raw: bytes) -> Frame:
    header_raw, sep, body = raw.partition(b"\n")
    try:
        header = orjson.loads(header_raw)
        kind, seq, attempt = header.pop("k"), header.pop("s"), header.pop("a")
    except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
        raise ProtocolError(f"malformed frame: {exc}") from exc
    if not sep or kind not in ("start", "head", "data", "end", "error", "ping"):
        raise ProtocolError(f"malformed frame of kind {kind!r}")
    return Frame(kind=kind, seq=seq, attempt=attempt, body=body, meta=header)


@dataclass(slots=True)
class WorkerEntry:
    """A worker's registry entry, rewritten every heartbeat under ``worker_key(id)``."""

    id: str
    hostname: str
    ollama_url: str
    version: str
    healthy: bool
    error: str
    models: list[dict[str, Any]]
    running: list[dict[str, Any]]
    slots: int
    in_flight: int
    started_at: float
    expires: float

    def to_json(self) -> bytes:
        return orjson.dumps(
            {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerEntry:
        try:
            return cls(**orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise ProtocolError(f"malformed registry entry: {exc}") from exc
