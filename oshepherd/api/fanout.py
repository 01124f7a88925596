"""One management request run on several workers, answered as one.

Each target worker runs the request against its own Ollama (a job on the worker's own
queue). Their answers merge into one:

* Progress (pull, push, create) is one NDJSON stream that never goes backwards (see
  ``ProgressMerge``). Layer lines are sent as they arrive, so a slow host never holds back
  the others' bars; the workers' own ``success`` lines are held back: the stream ends with
  ``{"status": "success"}`` only when every target succeeded, otherwise with
  ``{"error": "pull failed on <worker>: <error>; ...", "failed": {<worker>: <error>, ...}}``.
* If nothing was sent before the end (every target failed at once, ``stream: false``, copy,
  delete), the answer is an HTTP status: 200 when all succeeded, else the first failed
  target's status with the same message.
* An unload answers as one Ollama does: the first target's own answer (status, content
  type and body), once every target has answered.

A client that hangs up cancels every sub-job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from oshepherd.api.dispatcher import Dispatcher
from oshepherd.api.errors import ApiError, error_line, error_response, json_response
from oshepherd.api.jobstream import JobStream
from oshepherd.api.watched import WatchedResponse
from oshepherd.protocol import MODEL_CHANGING_PATHS, Data, End, Head, WorkerEntry

__all__ = ["Answer", "Fanout", "FanoutResponse", "Outcome", "ProgressMerge"]

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
SUCCESS = {"status": "success"}
SUCCESS_LINE = orjson.dumps(SUCCESS) + b"\n"
# How the answer is shaped: an NDJSON stream, the final object alone, an empty 200, or the
# first target's own answer.
Answer = Literal["stream", "object", "empty", "first"]


@dataclass(slots=True)
class Outcome:
    """How one target's job ended; ``error`` is empty on success. A job without progress
    keeps Ollama's ``body`` and ``content_type``."""

    worker: str
    status: int = 200
    error: str = ""
    body: bytes = b""
    content_type: str = ""


class ProgressMerge:
    """The progress lines of several workers, as one stream that never goes backwards.

    * A line with a ``digest`` carries the sums over the workers: ``total`` (a worker that
      has not reported the layer yet counts as the largest total seen, so the bar's length
      is right from its first line), ``completed``, and ``workers``, how many have
      reported it; ``status`` and other fields are those of the line that just arrived,
      whose sender is ``worker`` with its own ``worker_total`` and ``worker_completed``
      (``oshepherd pull`` draws a bar per host from them; Ollama's clients ignore fields
      they do not know). Per digest, neither ``total`` nor ``completed`` ever drops below
      what was sent.
    * A line without a digest is sent once for the fleet. A worker's first line
      ("pulling manifest") goes at once; any later one ("verifying sha256 digest",
      "writing manifest") is held back until every target has sent it or ended, so that it
      comes after every host has every layer. Held lines leave in the order they came.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._layers: dict[str, dict[str, tuple[int, int]]] = {}  # digest: worker: sizes
        self._sent: dict[str, tuple[int, int]] = {}  # digest: the total and completed sent
        self._senders: dict[str, set[str]] = {}  # status without a digest: who sent it
        self._held: list[tuple[str, dict[str, Any]]] = []  # (status, line), oldest first
        self._started: set[str] = set()
        self._ended: set[str] = set()

    def merge(self, worker: str, line: dict[str, Any]) -> list[bytes]:
        """The NDJSON lines to send now that ``worker`` sent ``line`` (maybe none)."""
        first = worker not in self._started
        self._started.add(worker)
        if digest := line.get("digest"):
            return [self._layer(worker, str(digest), line)]
        status = str(line.get("status", ""))
        senders = self._senders.get(status)
        if senders is not None:
            senders.add(worker)
            return self._release()
        self._senders[status] = {worker}
        if first:
            return [orjson.dumps(line) + b"\n"]
        self._held.append((status, line))
        return self._release()

    def end(self, worker: str) -> list[bytes]:
        """The held lines to send now that ``worker`` will send no more."""
        self._ended.add(worker)
        return self._release()

    def _layer(self, worker: str, digest: str, line: dict[str, Any]) -> bytes:
        layer = self._layers.setdefault(digest, {})
        own = layer[worker] = (_count(line.get("total")), _count(line.get("completed")))
        totals = [total for total, _ in layer.values()]
        sent_total, sent_completed = self._sent.get(digest, (0, 0))
        total = max(sum(totals) + (self._workers - len(layer)) * max(totals), sent_total)
        completed = max(sum(done for _, done in layer.values()), sent_completed)
        self._sent[digest] = (total, completed)
        merged = {
            **line,
            "total": total,
            "completed": completed,
            "workers": len(layer),
            "worker": worker,
            "worker_total": own[0],
            "worker_completed": own[1],
        }
        return orjson.dumps(merged) + b"\n"

    def _release(self) -> list[bytes]:
        out: list[bytes] = []
        while self._held:
            status, line = self._held[0]
            if len(self._senders[status] | self._ended) < self._workers:
                break
            del self._held[0]
            out.append(orjson.dumps(line) + b"\n")
        return out


class Fanout:
    """One request running on several workers; ``lines`` merges their progress."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        action: str,
        targets: Sequence[WorkerEntry],
        *,
        progress: bool,
    ) -> None:
        self._d = dispatcher
        self.action = action
        self._workers = [w.id for w in targets]
        self._progress = progress  # success is a "success" line, not merely a 2xx
        self._changes_models = False
        self._events: asyncio.Queue[Outcome | tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._streams: list[JobStream] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._outcomes: dict[str, Outcome] = {}
        self._merged = ProgressMerge(len(self._workers))

    async def start(
        self, method: str, path: str, body: str, *, residency: str = "", upload: str = ""
    ) -> None:
        """Queue the request for every target; a target that cannot take it has failed.

        ``residency`` marks a load or unload (``Job.residency``), ``upload`` names the
        blob upload whose items are the body (``Job.upload``).
        """
        self._changes_models = path in MODEL_CHANGING_PATHS or bool(residency)
        for worker in self._workers:
            try:
                stream = await self._d.submit_to(
                    worker, method, path, body, residency=residency, upload=upload
                )
            except ApiError as exc:
                self._events.put_nowait(Outcome(worker, exc.status, exc.message))
                continue
            self._streams.append(stream)
            self._tasks.append(asyncio.create_task(self._follow(worker, stream)))
        log.info("%s: on %s", self.action, ", ".join(self._workers))

    async def lines(self) -> AsyncIterator[bytes]:
        """Merged progress lines, as they arrive, until every target has ended."""
        while len(self._outcomes) < len(self._workers):
            event = await self._events.get()
            if isinstance(event, Outcome):
                self._outcomes[event.worker] = event
                if event.error:
                    log.warning("%s failed on %s: %s", self.action, event.worker, event.error)
                lines = self._merged.end(event.worker)
            else:
                lines = self._merged.merge(*event)
            for line in lines:
                yield line

    async def failure(self) -> ApiError | None:
        """After ``lines``: what failed, or None."""
        if self._changes_models:
            # The workers re-registered before they answered: the next request must see it.
            try:
                await self._d.refresh_registry(max_age=0.0)
            except ApiError as exc:
                log.warning("%s: registry not refreshed: %s", self.action, exc.message)
        failed = [o for w in self._workers if (o := self._outcomes[w]).error]
        if not failed:
            return None
        by_error: dict[str, list[str]] = {}
        for outcome in failed:
            by_error.setdefault(outcome.error, []).append(outcome.worker)
        where = "; ".join(f"{', '.join(workers)}: {error}" for error, workers in by_error.items())
        return ApiError(failed[0].status, f"{self.action} failed on {where}")

    @property
    def outcomes(self) -> Mapping[str, Outcome]:
        """The outcomes ``lines`` has taken so far, by worker (read-only)."""
        return MappingProxyType(self._outcomes)

    def first(self) -> Outcome:
        """After ``lines``: the first target's outcome (Ollama's answer on its host)."""
        return self._outcomes[self._workers[0]]

    async def close(self) -> None:
        """Stop following; every job that did not finish is cancelled."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in self._streams:
            await stream.close()

    async def _follow(self, worker: str, stream: JobStream) -> None:
        try:
            outcome = await self._read(worker, stream)
        except ApiError as exc:
            outcome = Outcome(worker, exc.status, exc.message)
        except Exception as exc:  # an outcome must arrive, or the answer would never end
            log.exception("%s: following %s failed", self.action, worker)
            outcome = Outcome(worker, 500, f"the gateway failed: {exc!r}")
        self._events.put_nowait(outcome)

    async def _read(self, worker: str, stream: JobStream) -> Outcome:
        """Pass the worker's progress lines on; its ``success`` or error decides the outcome.
        Without progress, a 2xx answer is kept whole."""
        head = await stream.head()
        status = head.status
        frame: Head | Data | End = head
        kept = bytearray()
        keep = status < 400 and not self._progress
        succeeded = keep
        while True:
            if keep:
                kept += frame.body
            for line in () if keep else _lines(frame.body):
                if status >= 400 or "error" in line:
                    return Outcome(worker, status if status >= 400 else 500, str(line.get("error")))
                if line.get("status") == "success":
                    succeeded = True
                else:
                    self._events.put_nowait((worker, line))
            if isinstance(frame, End) or (isinstance(frame, Head) and frame.last):
                break
            frame = await stream.next()
        if status >= 400:
            return Outcome(worker, status, f"Ollama answered {status}")
        if not succeeded:
            return Outcome(worker, 502, "the progress ended without success")
        return Outcome(worker, status, body=bytes(kept), content_type=head.content_type)


class FanoutResponse(WatchedResponse):
    """The merged answer of a ``Fanout``, shaped as ``answer`` asks."""

    def __init__(self, fanout: Fanout, answer: Answer, path: str) -> None:
        super().__init__(path)
        self._fanout = fanout
        self._answer = answer

    def __str__(self) -> str:
        return self._fanout.action

    async def close(self) -> None:
        """Every sub-job that did not finish is cancelled."""
        await self._fanout.close()

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        async for line in self._fanout.lines():
            if self._answer != "stream":
                continue
            if not started:
                started = True
                headers = [(b"content-type", NDJSON.encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": line, "more_body": True})
        failure = await self._fanout.failure()
        if started:
            last = self._last_line(failure) if failure else SUCCESS_LINE
            await send({"type": "http.response.body", "body": last})
            return
        await self._final(failure)(scope, receive, send)

    def _last_line(self, failure: ApiError) -> bytes:
        """The stream's last line after a failure: Ollama's error line, plus ``failed``,
        each failed target's error by worker."""
        line = orjson.loads(error_line(self.path, failure.message, sse=False))
        line["failed"] = {w: o.error for w, o in self._fanout.outcomes.items() if o.error}
        return orjson.dumps(line) + b"\n"

    def _final(self, failure: ApiError | None) -> Response:
        """The whole answer when no progress line was sent."""
        if failure is not None:
            return error_response(self.path, failure)
        if self._answer == "first":
            first = self._fanout.first()
            return Response(first.body, first.status, media_type=first.content_type or None)
        if self._answer == "stream":
            return Response(SUCCESS_LINE, media_type=NDJSON)
        if self._answer == "object":
            return json_response(SUCCESS)
        return Response(status_code=200)


def _lines(body: bytes) -> list[dict[str, Any]]:
    """The JSON objects of an NDJSON body (or of one JSON object); any other text is an error."""
    out: list[dict[str, Any]] = []
    for raw in body.splitlines():
        if not raw.strip():
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = None
        text = raw.decode(errors="replace").strip()
        out.append(value if isinstance(value, dict) else {"error": text})
    return out


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
