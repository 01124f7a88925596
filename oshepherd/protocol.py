"""The wire: every Redis key, channel, queue, script, task and frame, defined once, with no I/O.

Both the async API and the worker import this module; no other module spells a Redis name.
Everything on the wire is JSON (never pickle).

A job's life on the wire::

    API   ENQUEUE_SCRIPT   LPUSH celery_message(job) on its queue (refused when full)
    worker START_SCRIPT    skip it if cancelled, else PUBLISH Start on job.channel
    worker                 PUBLISH Head, Data..., End | Error on job.channel
    API   cancel_key       SET to CANCEL_ALL (or to the first attempt still allowed) and
                           PUBLISH the job id on CANCEL_CHANNEL

Frames travel on a job's reply channel as ``<json header>\\n<body bytes>``: the header is
small JSON, the body is Ollama's bytes untouched (complete NDJSON lines or SSE events), so
relaying them costs no re-encoding.
"""

from __future__ import annotations

import base64
import secrets
import time
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import orjson

__all__ = [
    "BLOB_DATA",
    "BLOB_TTL",
    "CANCEL_ALL",
    "CANCEL_CHANNEL",
    "ENQUEUE_SCRIPT",
    "KEYS",
    "KEYS_VERSION",
    "LOAD",
    "MODEL_CHANGING_PATHS",
    "OLDEST_SCRIPT",
    "PRIORITY_STEP",
    "PRIORITY_STEPS",
    "START_SCRIPT",
    "STATS_TTL",
    "SUPERSEDE_SCRIPT",
    "TASK_NAME",
    "TENANTS",
    "UNLOAD",
    "WORKERS_INDEX",
    "BlobAbort",
    "BlobAck",
    "BlobEnd",
    "Data",
    "End",
    "Error",
    "Frame",
    "Head",
    "Job",
    "Ping",
    "ProtocolError",
    "Start",
    "WorkerEntry",
    "binary_body",
    "blob_ack_channel",
    "blob_chunks_key",
    "blob_key",
    "cancel_key",
    "celery_message",
    "decode_blob_part",
    "decode_frame",
    "job_channel",
    "job_channel_pattern",
    "job_id_from_channel",
    "model_queue",
    "new_id",
    "queue_key",
    "queue_worker",
    "started_key",
    "worker_key",
    "worker_queue",
    "worker_stats_key",
]

PREFIX = "oshepherd"
TASK_NAME = "oshepherd.run_job"
JSON_BODY = "application/json"  # the Content-Type of a job's JSON body
WORKERS_INDEX = f"{PREFIX}:workers"  # zset: worker id -> expiry (epoch s); readers never SCAN
# API keys (``oshepherd.keys``): hash sha256(secret) hex -> ApiKey JSON; the version is
# INCRed by every change, which each API replica polls to reload its table; the tenants are
# the keys' ids (the workers read them, never the keys).
KEYS = f"{PREFIX}:keys"
KEYS_VERSION = f"{PREFIX}:keys:version"
TENANTS = f"{PREFIX}:tenants"
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # one channel; the message is the job id
# Jobs on these paths change what a host holds: the worker re-registers before it answers,
# so the API's next look at the registry sees the change.
MODEL_CHANGING_PATHS = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})
# ``Job.residency`` of a job that loads or unloads its model (what the host has in memory).
LOAD, UNLOAD = "load", "unload"


class ProtocolError(ValueError):
    """A frame, job or registry entry that does not follow the wire format."""


def new_id() -> str:
    """A random id (32 hex digits) for a job or an API process."""
    return secrets.token_hex(16)


def model_queue(model: str, tenant: str = "") -> str:
    """Queue of the jobs of ``tenant`` (a key id; "" without keys) that any worker holding
    ``model`` (normalized) may take. Each tenant has its own, so that a worker's round robin
    over its queues shares it among tenants (kombu's queue cycle).

    Names contain ':' and '/', which is why kombu's ``sep`` must never be ':'; '|' never
    occurs in an Ollama model name.
    """
    return f"{PREFIX}.model.{model}|{tenant}" if tenant else f"{PREFIX}.model.{model}"


def worker_queue(worker_id: str) -> str:
    """Queue of jobs aimed at one worker (model management on its host)."""
    return f"{PREFIX}.worker.{worker_id}"


# kombu's Redis transport priority steps (the worker's transport option ``priority_steps``):
# a queue is one Redis list per step, and a worker's BRPOP names every list of step 0 first,
# then of step 3, then 6, so it takes the highest-priority job waiting on any of its queues.
PRIORITY_STEPS = (0, 3, 6)
PRIORITY_STEP = {"high": 0, "normal": 3, "low": 6}  # a request's priority level -> step
_KOMBU_SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep


def queue_key(queue: str, step: int) -> str:
    """The Redis list a message of priority ``step`` waits in on ``queue`` (kombu's
    ``Channel._q_for_pri``): the queue's name for step 0, else the name, kombu's separator
    and the step."""
    return f"{queue}{_KOMBU_SEP}{step}" if step else queue


def queue_worker(queue: str) -> str | None:
    """The worker a ``worker_queue`` is aimed at; None for a model's queue."""
    prefix = worker_queue("")
    return queue[len(prefix) :] if queue.startswith(prefix) else None


def worker_key(worker_id: str) -> str:
    """Registry entry of one worker (``WorkerEntry`` as JSON, with a TTL)."""
    return f"{PREFIX}:worker:{worker_id}"


def worker_stats_key(worker_id: str) -> str:
    """What one worker's jobs counted (``oshepherd.worker.stats``): a hash, per model
    ``<model>|prompt`` and ``<model>|completion`` (tokens, HINCRBY'd: ints) and
    ``<model>|tps`` (Ollama's generation speed over its latest jobs, tokens/s: a float);
    expires ``STATS_TTL`` seconds after the worker's last heartbeat."""
    return f"{PREFIX}:stats:{worker_id}"


STATS_TTL = 7 * 86400


def cancel_key(job_id: str) -> str:
    """The first attempt of a job still allowed to start (``CANCEL_ALL``: none).

    Set by the API when the client leaves or the queue deadline passes (``CANCEL_ALL``),
    or when it gives up on one attempt and queues the next (that next attempt's number):
    ``START_SCRIPT`` then refuses the attempts before it, never the re-run.
    """
    return f"{PREFIX}:cancel:{job_id}"


def started_key(job_id: str) -> str:
    """The last attempt of a job that started (set by ``START_SCRIPT``), for a while."""
    return f"{PREFIX}:started:{job_id}"


CANCEL_ALL = 1 << 30
# Seconds a started key lives: it only matters until the API has seen the start frame.
STARTED_TTL = 60
# Seconds. A cancelled attempt's message leaves its queue in the same round trip (LREM);
# the key stops a worker that took it just before, however long it had waited.
CANCEL_TTL = 3600

# Backpressure and enqueue in one round trip. KEYS: queue. ARGV: message, max depth.
# Returns the new depth, or -1 when the queue was full and nothing was pushed.
ENQUEUE_SCRIPT = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""
# When the next message of each list in KEYS was queued (a worker pops from the right):
# the ``queued`` field at the head of its envelope (see ``celery_message``), or false for
# an empty list. Only a message's first bytes are searched, however large its body.
OLDEST_SCRIPT = """
local stamps = {}
for i, key in ipairs(KEYS) do
  local message = redis.call('LINDEX', key, -1)
  local head = message and string.sub(message, 1, 64)
  stamps[i] = head and string.match(head, '^{"queued":([%d%.eE+-]+)') or false
end
return stamps
"""
# A worker claims a job: refused (0) when the cancel key forbids this attempt, else the
# attempt is marked started and the start frame published (1), in one round trip.
# KEYS: cancel key, started key. ARGV: reply channel, start frame, attempt.
START_SCRIPT = f"""
local first = redis.call('GET', KEYS[1])
if first and tonumber(ARGV[3]) < tonumber(first) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', {STARTED_TTL})
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
# The API gives up on an attempt that has left its queue without starting (its worker
# died with it): it may never start (1), unless it is still queued or has started (0).
# Atomic with START_SCRIPT, so a worker that took the job a moment ago either started it
# first (the API keeps following it) or is refused (the re-run is the only run).
# KEYS: queue, cancel key, started key. ARGV: message, attempt.
SUPERSEDE_SCRIPT = f"""
if redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
local started = redis.call('GET', KEYS[3])
if started and tonumber(started) >= tonumber(ARGV[2]) then return 0 end
local first = tonumber(redis.call('GET', KEYS[2]) or 0)
redis.call('SET', KEYS[2], math.max(first, tonumber(ARGV[2]) + 1), 'EX', {CANCEL_TTL})
return 1
"""


# A blob upload (POST /api/blobs/:digest) reaches each target worker as the items of a list
# of its own: data (the ``BLOB_DATA`` tag, then raw bytes), then ``BlobEnd`` (every byte
# sent, the digest checked) or ``BlobAbort``. The worker acks each item it takes (``BlobAck``
# on ``blob_ack_channel``: a worker pushes on no list), so the API keeps at most a small
# window ahead of the slowest worker. Every key expires ``BLOB_TTL`` seconds after the API
# last refreshed it: an upload whose API went away leaves nothing.
BLOB_TTL = 15.0  # seconds
BLOB_DATA = b"d"
_BLOB_END = b"e"
_BLOB_ABORT = b"a"


def blob_key(upload_id: str) -> str:
    """Exists (with a TTL the API refreshes) while the API runs the upload ``upload_id``."""
    return f"{PREFIX}:blob:{upload_id}"


def blob_chunks_key(upload_id: str, worker_id: str) -> str:
    """The list of one target worker's items of an upload (see ``BLOB_DATA``)."""
    return f"{PREFIX}:blob:{upload_id}:chunks:{worker_id}"


def blob_ack_channel(job: Job) -> str:
    """The channel the workers of the upload ``job.upload`` ack on (``BlobAck``).

    It is a reply channel of the API that runs the upload (``job_channel(api, upload id)``):
    its one pattern subscription covers it, a worker publishes there as on any reply
    channel, and an ack published after the upload ended is gone (Pub/Sub keeps nothing).
    """
    return f"{job.channel.rpartition(':')[0]}:{job.upload}"


@dataclass(slots=True, frozen=True)
class BlobAck:
    """A worker has taken ``taken`` items of an upload so far (a count, not a delta: an
    ack lost with a dropped connection is made up for by the next one)."""

    worker: str
    taken: int

    def encode(self) -> bytes:
        return f"{self.taken} {self.worker}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> BlobAck:
        """Raises ``ProtocolError`` for anything but an ack."""
        taken, _, worker = raw.decode(errors="replace").partition(" ")
        if not taken.isdigit() or not worker:
            raise ProtocolError(f"malformed blob ack: {raw[:64]!r}")
        return cls(worker, int(taken))


@dataclass(slots=True, frozen=True)
class BlobEnd:
    """The last item of an upload: ``size`` bytes were sent, and their digest is right."""

    size: int

    def encode(self) -> bytes:
        return _BLOB_END + str(self.size).encode()


@dataclass(slots=True, frozen=True)
class BlobAbort:
    """The upload stops: the worker fails its job with ``status`` and ``error``, and its
    Ollama never sees the end of the body (so it keeps nothing)."""

    status: int
    error: str

    def encode(self) -> bytes:
        return _BLOB_ABORT + orjson.dumps({"status": self.status, "error": self.error})


def decode_blob_part(raw: bytes) -> memoryview | BlobEnd | BlobAbort:
    """An item of an upload's list: its data (a view, not a copy), or a closing item.

    Raises ``ProtocolError`` for anything else.
    """
    tag = raw[:1]
    if tag == BLOB_DATA:
        return memoryview(raw)[1:]
    try:
        if tag == _BLOB_END:
            return BlobEnd(int(raw[1:]))
        if tag == _BLOB_ABORT:
            why = orjson.loads(raw[1:])
            return BlobAbort(int(why["status"]), str(why["error"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed blob item: {exc}") from exc
    raise ProtocolError(f"malformed blob item: unknown tag {tag!r}")


def job_channel(api_id: str, job_id: str) -> str:
    """Reply channel of a job. One pattern subscription per API process covers them all."""
    return f"{PREFIX}:job:{api_id}:{job_id}"


def job_channel_pattern(api_id: str) -> str:
    """The pattern matching every reply channel of the API process ``api_id``."""
    return f"{PREFIX}:job:{api_id}:*"


def job_id_from_channel(channel: str) -> str:
    return channel.rpartition(":")[2]


@dataclass(slots=True)
class Job:
    """One request for one Ollama host: the Celery task's single argument.

    ``body`` is the client's JSON text, forwarded to Ollama byte for byte; ``model`` is the
    normalized name, used for routing only (empty for a job aimed at one worker);
    ``deadline`` is the latest start, in epoch seconds, or None (JSON null): no limit, the
    job waits as long as its client does (``QUEUE_TIMEOUT`` unset, as Ollama has none);
    ``queue`` is where it waits.
    ``residency`` is ``LOAD`` or ``UNLOAD`` when the job only loads or unloads its model
    on the host (a generate or chat without prompt or messages): the worker then re-polls
    its host and re-registers before it ends the answer. Empty for every other job.
    ``content_type`` is empty when ``body`` is JSON text; otherwise it is the media type of
    the bytes ``body`` carries in base64 (``binary_body``: an upload, since Celery messages
    are JSON), and both go to Ollama as the client sent them.
    ``upload`` names a blob upload whose items (``blob_chunks_key``) are the body, streamed
    to Ollama as they arrive; empty for every other job.
    ``tenant`` is the key id of the caller ("" without keys) and ``priority`` its kombu
    priority step (``PRIORITY_STEP``); the job waits in ``queue_key(queue, priority)``.
    ``queued`` is when it was queued (epoch s), from when a host that would have to load
    the model leaves it to hosts that have it loaded (the worker's ``WARM_WAIT``); negated
    when no live host had the model loaded then, so that a cold host takes it at once (its
    magnitude still tells how long it has waited); 0.0 when unknown.
    ``request_id`` is the ``X-Request-Id`` of the request the job is for (its log lines on
    the worker name it); "" from an older API.
    """

    id: str
    channel: str
    method: str
    path: str
    body: str
    model: str
    deadline: float | None
    attempt: int = 0
    queue: str = ""
    residency: str = ""
    content_type: str = ""
    upload: str = ""
    tenant: str = ""
    priority: int = PRIORITY_STEP["normal"]
    queued: float = 0.0
    request_id: str = ""

    @property
    def key(self) -> str:
        """The Redis list the job waits in."""
        return queue_key(self.queue, self.priority)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _JOB_FIELDS}

    def content(self) -> tuple[bytes, str]:
        """The request body for Ollama, and its Content-Type."""
        if not self.content_type:
            return self.body.encode(), JSON_BODY
        return base64.b64decode(self.body), self.content_type

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        """Raises ``ProtocolError`` when ``data`` is not a job's fields."""
        try:
            return cls(**data)
        except TypeError as exc:
            raise ProtocolError(f"malformed job: {exc}") from exc

    def expired(self) -> bool:
        """Whether the job has a deadline and it has passed."""
        return self.deadline is not None and time.time() > self.deadline


_JOB_FIELDS = tuple(f.name for f in fields(Job))


def binary_body(raw: bytes) -> str:
    """``raw`` as a job's ``body`` (base64), for a job whose ``content_type`` says what it is."""
    return base64.b64encode(raw).decode("ascii")


def celery_message(job: Job) -> bytes:
    """The kombu/Celery (task protocol 2) envelope for ``job``, ready to LPUSH on its queue.

    Publishing it natively from asyncio costs one Redis command; ``apply_async`` is
    synchronous and several times slower. The body is plain JSON (no base64), which
    kombu accepts when ``body_encoding`` is absent. ``argsrepr`` names only the job id so
    worker logs never carry prompts. The envelope starts with ``queued`` (kombu ignores it)
    for ``OLDEST_SCRIPT``, which reads no further.
    """
    body = orjson.dumps(
        [[job.to_dict()], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    envelope = {
        "queued": job.queued,
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
            "argsrepr": f"[job {job.id} request {job.request_id}]",
            "kwargsrepr": "{}",
            "origin": "oshepherd-api",
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": job.id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": job.queue},
            "priority": job.priority,
            "delivery_tag": new_id(),
        },
    }
    return orjson.dumps(envelope)


@dataclass(slots=True, kw_only=True)
class Frame:
    """One message on a job's reply channel; its subclasses are the kinds.

    ``seq`` counts from 0 within an ``attempt`` (a gap means lost frames); ``body`` is
    Ollama's bytes, complete lines or events only. On the wire the header holds ``kind``,
    ``seq``, ``attempt`` and the kind's own fields, every one always present.
    """

    kind: ClassVar[str]
    seq: int
    attempt: int
    body: bytes = b""

    def encode(self) -> bytes:
        header: dict[str, Any] = {"kind": self.kind}
        for name, _ in _HEADERS[self.kind]:
            header[name] = getattr(self, name)
        return orjson.dumps(header) + b"\n" + self.body


@dataclass(slots=True, kw_only=True)
class Start(Frame):
    """A worker claimed the job (sent by ``START_SCRIPT``)."""

    kind: ClassVar[str] = "start"
    worker: str


@dataclass(slots=True, kw_only=True)
class Head(Frame):
    """Ollama answered: its status and content type, and the first complete lines.

    ``last``: the body is the whole response (no data or end frame follows).
    """

    kind: ClassVar[str] = "head"
    status: int
    content_type: str
    last: bool
    # With ``last``: the tokens Ollama counted, as ``End``'s (0 otherwise).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    eval_duration: int = 0


@dataclass(slots=True, kw_only=True)
class Data(Frame):
    """More complete lines of the response."""

    kind: ClassVar[str] = "data"


@dataclass(slots=True, kw_only=True)
class End(Frame):
    """The response is complete; ``body`` is its rest.

    ``prompt_tokens`` and ``completion_tokens`` are what Ollama counted for the request, read
    by the worker from its final chunk or ``usage`` fields (``oshepherd.tokens``), 0 when it
    gave none; ``eval_duration`` is Ollama's generation time in nanoseconds, 0 when unknown.
    """

    kind: ClassVar[str] = "end"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    eval_duration: int = 0


@dataclass(slots=True, kw_only=True)
class Error(Frame):
    """The attempt failed: an HTTP ``status`` and a message. ``retry``: the job never
    reached Ollama, so another worker may run it."""

    kind: ClassVar[str] = "error"
    status: int
    error: str
    retry: bool


@dataclass(slots=True, kw_only=True)
class Ping(Frame):
    """Keep-alive while Ollama is silent (loading a model, a long prompt)."""

    kind: ClassVar[str] = "ping"


KINDS: dict[str, type[Frame]] = {cls.kind: cls for cls in (Start, Head, Data, End, Error, Ping)}
# Per kind, the header's fields after ``kind`` (seq, attempt, the kind's own) and their
# exact JSON types.
_HEADERS: dict[str, tuple[tuple[str, type], ...]] = {
    kind: tuple(
        (f.name, typing.get_type_hints(cls)[f.name]) for f in fields(cls) if f.name != "body"
    )
    for kind, cls in KINDS.items()
}


def decode_frame(raw: bytes) -> Frame:
    """A frame from the wire, its header checked once: every field present, of its type.

    Raises ``ProtocolError`` for anything else.
    """
    header_raw, sep, body = raw.partition(b"\n")
    try:
        header = orjson.loads(header_raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed frame header: {exc}") from exc
    if not sep or not isinstance(header, dict):
        raise ProtocolError("malformed frame: no JSON object header")
    kind = header.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"malformed frame: unknown kind {kind!r}")
    values: dict[str, Any] = {"body": body}
    for name, expected in _HEADERS[cls.kind]:
        value = header.get(name)
        if type(value) is not expected:  # exact: a bool is no status, an int no flag
            raise ProtocolError(f"malformed {kind} frame: {name!r} must be {expected.__name__}")
        values[name] = value
    return cls(**values)


@dataclass(slots=True)
class WorkerEntry:
    """A worker's registry entry, rewritten every heartbeat under ``worker_key(id)``.

    ``models`` and ``running`` are the host's ``/api/tags`` and ``/api/ps`` entries as
    Ollama wrote them; ``started_at`` and ``expires`` are epoch seconds. ``cloud`` is the
    ``cloud`` object of the host's ``/api/status`` (``{"disabled": bool, "source": str}``),
    empty from a host without that route or an older worker. ``last_seen`` is when the
    entry was written (epoch s; 0 from an older worker).
    """

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
    cloud: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerEntry:
        """Raises ``ProtocolError`` when ``raw`` is not an entry's JSON."""
        try:
            return cls(**orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise ProtocolError(f"malformed registry entry: {exc}") from exc


# Limits and usage per API key (``oshepherd.api.limits``, ``oshepherd.usage``): the API's
# alone, no worker reads or writes them. Days are UTC dates, "YYYY-MM-DD".
LIMITS_PREFIX = f"{PREFIX}:limits"
USAGE_TTL = 400 * 86400  # seconds a day of usage is kept
BUDGET_TTL = 2 * 86400  # seconds a day's token counter outlives its day's start


def lease_key(tenant: str) -> str:
    """Zset of ``tenant``'s concurrency leases: lease id -> expiry (epoch s)."""
    return f"{LIMITS_PREFIX}:leases:{tenant}"


def rate_key(tenant: str) -> str:
    """``tenant``'s requests-per-minute state (pyrate-limiter's GCRA, its own hash)."""
    return f"{LIMITS_PREFIX}:rpm:{tenant}"


def budget_key(tenant: str, day: str) -> str:
    """Tokens (prompt + completion) ``tenant`` has used on ``day``: an int."""
    return f"{LIMITS_PREFIX}:tokens:{tenant}:{day}"


def usage_key(day: str) -> str:
    """Usage on ``day``: a hash ``<tenant>|<model>|<metric>`` -> int, where the metric is
    ``requests``, ``prompt`` or ``completion`` (tokens) and the tenant "" means no key ('|'
    occurs in neither a key id nor a model name)."""
    return f"{PREFIX}:usage:{day}"


THROUGHPUT_BUCKET = 10  # seconds of requests one throughput bucket counts
THROUGHPUT_TTL = 120  # seconds a throughput bucket is kept: the last minute, and more


def throughput_key(bucket: int) -> str:
    """Requests that ended in the ``THROUGHPUT_BUCKET`` seconds from
    ``bucket * THROUGHPUT_BUCKET`` (epoch s): a hash ``<model>|<metric>`` -> int, the
    metrics of ``usage_key``, written with the usage and read by
    ``GET /oshepherd/v1/throughput``."""
    return f"{PREFIX}:rate:{bucket}"


# Admission of one request: refused (1) when the day's tokens reached the budget, else (2)
# when the live leases (those not expired) reached the concurrency limit, else a lease is
# taken (0). A limit of -1 is none. KEYS: lease key, budget key. ARGV: now (epoch s), lease
# id, lease expiry (epoch s), max concurrent, token budget, lease key TTL (s).
ADMIT_SCRIPT = """
local budget = tonumber(ARGV[5])
if budget >= 0 and tonumber(redis.call('GET', KEYS[2]) or 0) >= budget then return 1 end
local most = tonumber(ARGV[4])
if most < 0 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= most then return 2 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 0
"""


def admitted_enqueue_script(rate_script: str) -> str:
    """A request's first job queued and the request admitted, in one script (so limits cost
    no round trip of their own). KEYS: lease zset, budget key, rate key, the job's list.
    ARGV: message, max depth, then ``ADMIT_SCRIPT``'s six arguments, then 1 and
    ``rate_script``'s arguments (a rate limiter's script, run as is), or 0 without a rate.

    A full list refuses first and takes nothing. Then ``ADMIT_SCRIPT``; the rate counts the
    attempt even when ``ADMIT_SCRIPT`` refused it, and when the rate refuses it the lease
    just taken is given back. The message is pushed only when both admit it. Returns
    {admit verdict, the rate's failing index (-1: admitted), its retry (ms), the list's new
    depth (-1: full; 0: not pushed)}.
    """
    return f"""
local function admit(KEYS, ARGV)
{ADMIT_SCRIPT}
end
local function rate(KEYS, ARGV)
{rate_script}
end
if redis.call('LLEN', KEYS[4]) >= tonumber(ARGV[2]) then return {{0, -1, 0, -1}} end
local admit_argv = {{}}
for i = 3, 8 do admit_argv[#admit_argv + 1] = ARGV[i] end
local verdict = admit({{KEYS[1], KEYS[2]}}, admit_argv)
local failing, retry = -1, 0
if ARGV[9] == '1' then
    local rate_argv = {{}}
    for i = 10, #ARGV do rate_argv[#rate_argv + 1] = ARGV[i] end
    local limited = rate({{KEYS[3]}}, rate_argv)
    failing, retry = tonumber(limited[1]), limited[2]
    if failing >= 0 and verdict == 0 and tonumber(admit_argv[4]) >= 0 then
        redis.call('ZREM', KEYS[1], admit_argv[2])
    end
end
if verdict ~= 0 or failing >= 0 then return {{verdict, failing, retry, 0}} end
return {{0, -1, 0, redis.call('LPUSH', KEYS[4], ARGV[1])}}
"""
