"""One job's frames, as its response consumes them: the head, then the body, then the end.

``JobStream`` reads the job's ``Inbox`` and deals with everything on the way: frames of an
attempt given up on, pings, gaps, the queue deadline, a stalled or vanished worker
(``Liveness``), and a failure before the head that the dispatcher may re-run elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

from oshepherd.api.errors import (
    ApiError,
    JobFailed,
    NoHealthyWorker,
    QueueTimeout,
    RedisUnavailable,
    Unauthorized,
    Unavailable,
)
from oshepherd.api.inbox import LOST, Inbox
from oshepherd.api.metrics import note_model, note_started
from oshepherd.protocol import (
    CANCEL_ALL,
    Data,
    End,
    Error,
    Frame,
    Head,
    Job,
    Ping,
    ProtocolError,
    Start,
    decode_frame,
    queue_worker,
)
from oshepherd.usage import Usage

__all__ = [
    "LIVENESS_TICK",
    "LOST_AFTER",
    "ORPHANED_AFTER",
    "REVOKED_AFTER",
    "Cancel",
    "JobStream",
    "Liveness",
    "Rerun",
]

log = logging.getLogger(__name__)

LIVENESS_TICK = 1.0  # seconds of silence between two looks at the job's liveness
# A job gone from its queue that no worker has reported starting this long (seconds) after
# it was queued was lost with its worker (taken, then killed before it could start).
LOST_AFTER = 3.0
# A waiting job no live worker can take (every holder of its model, or its one target, is
# gone) this long (seconds) fails: longer than a worker's restart, shorter than forever.
ORPHANED_AFTER = 10.0
# A waiting job whose key was revoked (its tenant gone) this long (seconds) fails with a 401:
# seen on two looks at least a second apart, so never on a view of the tenants older than
# the key (the registry is refreshed every second).
REVOKED_AFTER = 0.5
# Seconds a stream whose client left keeps listening for its job's End, for the tokens.
END_GRACE = 0.5

# Make sure ``job`` never runs (on), or with ``before`` only its attempts before that one.
Cancel = Callable[[Job, bytes, int], Awaitable[None]]
# Queue ``job`` again after its attempt failed on ``worker`` before reaching Ollama: the
# new attempt's message, or None when it is not re-run.
Rerun = Callable[[Job, "str | None"], Awaitable["bytes | None"]]


class Liveness:
    """Whether a job that has gone quiet is still on its way; asked after each
    ``LIVENESS_TICK`` without a frame.

    Waiting: past its deadline, if it has one (``queue_timeout`` None: none), the job times
    out (``QueueTimeout``). A job that has left its queue (a worker took it) with no
    ``Start`` ``LOST_AFTER`` seconds after it was queued was lost with a worker that died
    before it could start it: ``supersede`` makes sure, atomically with the worker's start
    script, that this attempt never starts, and says whether it did so. A job that no live
    worker could take (``takers``) for ``orphaned_after`` seconds fails with a 503: with no
    queue deadline it would otherwise wait forever; one whose key was revoked (``revoked``)
    fails with a 401 after ``REVOKED_AFTER``.
    Running: its worker's registry entry expired (the worker died), or no frame, not even
    a ``Ping``, came for ``stall_timeout`` seconds.
    A lost job is a retryable ``Error``: it never reached Ollama, or is no longer running.
    """

    def __init__(
        self,
        *,
        alive: Callable[[str], bool],
        supersede: Callable[[Job, bytes], Awaitable[bool]],
        takers: Callable[[Job], bool],
        revoked: Callable[[Job], bool],
        queue_timeout: float | None,
        stall_timeout: float,
        orphaned_after: float = ORPHANED_AFTER,
    ) -> None:
        self._alive = alive
        self._supersede = supersede
        self.takers = takers
        self._revoked = revoked
        self._queue_timeout = queue_timeout
        self._stall_timeout = stall_timeout
        self._orphaned_after = orphaned_after

    async def waiting(
        self, job: Job, message: bytes, waited: float, orphaned: float
    ) -> Error | None:
        """A job not started after ``waited`` seconds in its queue, ``orphaned`` of them
        with no live worker to take it; raises ``QueueTimeout``, ``Unauthorized`` and
        ``Unavailable``."""
        if self._queue_timeout is not None and job.expired():
            raise QueueTimeout(self._queue_timeout)
        if orphaned > REVOKED_AFTER and self._revoked(job):
            raise Unauthorized(
                "the API key of this request was revoked while it waited", code="invalid_api_key"
            )
        if orphaned > self._orphaned_after:
            target = queue_worker(job.queue)
            raise (
                Unavailable(f"worker {target} went away") if target else NoHealthyWorker(job.model)
            )
        if waited < LOST_AFTER or not await self._supersede(job, message):
            return None
        log.warning("job %s: attempt %d left its queue but never started", job.id, job.attempt)
        return _lost(job, "the worker that took the job went away")

    def running(self, job: Job, worker: str, silent: float) -> Error | None:
        """A job started on ``worker``, no frame for ``silent`` seconds."""
        if not self._alive(worker):
            return _lost(job, f"worker {worker} went away")
        if silent > self._stall_timeout:
            return _verdict(job, 504, f"worker {worker} stalled", retry=False)
        return None


def _lost(job: Job, error: str) -> Error:
    return _verdict(job, 502, error, retry=True)


def _verdict(job: Job, status: int, error: str, *, retry: bool) -> Error:
    # Made here, never sent: no place in the attempt's sequence.
    return Error(seq=-1, attempt=job.attempt, status=status, error=error, retry=retry)


class JobStream:
    """The frames of one job: ``head`` once, then ``next`` until it returns ``End``.

    Both raise ``ApiError`` when the job fails: before the head, once any re-run is
    exhausted; after it, the response has begun and ends with an error line. ``close``
    cancels the job unless it ended well. A model-bound job counts in ``usage``, with the
    tokens its final frame carries.
    """

    def __init__(
        self,
        job: Job,
        message: bytes,
        inbox: Inbox,
        *,
        liveness: Liveness,
        cancel: Cancel,
        rerun: Rerun,
        usage: Usage | None = None,
    ) -> None:
        self.job = job
        self._usage = usage if job.model else None
        if self._usage is not None:
            self._usage.job(job.model)
        if job.model:
            note_model(job.model)
        self._inbox = inbox
        self._liveness = liveness
        self._cancel = cancel
        self._rerun = rerun
        self._finished = False  # the job ended well: nothing to cancel
        self._attempt(message)

    def _attempt(self, message: bytes) -> None:
        """Follow a new attempt of the job, queued as ``message``."""
        self._message = message
        self._enqueued = time.monotonic()
        self._last_frame = 0.0
        self._seq = 0
        self._orphaned_since: float | None = None
        self.worker: str | None = None

    async def close(self) -> None:
        """Stop following the job; unless it ended well, make sure it stops (and count the
        tokens of an answer its client left at the very end of: ``_last_tokens``)."""
        if not self._finished:
            await self._cancel(self.job, self._message, CANCEL_ALL)
            if self._usage is not None and self.worker is not None:
                await self._last_tokens()
        self._inbox.close()

    async def _last_tokens(self) -> None:
        """Wait up to ``END_GRACE`` seconds for the job's ``End``, and count its tokens.

        An SDK closes the connection as soon as it reads an OpenAI stream's ``[DONE]``,
        which can be before the ``End`` frame carrying the answer's tokens arrives: without
        this, that request's tokens would escape the key's budget. A job cancelled mid-way
        sends no ``End``: the wait ends at the deadline or at its ``Error``.
        """
        assert self._usage is not None
        deadline = time.monotonic() + END_GRACE
        while (left := deadline - time.monotonic()) > 0:
            raw = await self._inbox.get(left)
            if raw is None or raw == LOST:
                return
            try:
                frame = decode_frame(raw)
            except ProtocolError:
                return
            if frame.attempt != self.job.attempt:
                continue
            if isinstance(frame, End):
                self._usage.add(self.job.model, frame.prompt_tokens, frame.completion_tokens)
                return
            if isinstance(frame, Error):
                return

    async def head(self) -> Head:
        """Ollama's status, content type and first lines (the whole body if ``last``)."""
        while True:
            frame = await self._receive()
            if isinstance(frame, Head):
                self._finished = frame.last
                if frame.last and self._usage is not None:
                    self._usage.add(self.job.model, frame.prompt_tokens, frame.completion_tokens)
                return frame
            if isinstance(frame, Error):
                message = await self._rerun(self.job, self.worker) if frame.retry else None
                if message is not None:
                    self._attempt(message)
                    continue
                raise JobFailed(frame.status, frame.error)
            self._fail(JobFailed(502, f"worker {self.worker} sent {frame.kind} before a head"))

    async def next(self) -> Data | End:
        """After the head: more of the body, or its ``End`` (with the rest of it)."""
        frame = await self._receive()
        if isinstance(frame, Data):
            return frame
        if isinstance(frame, End):
            self._finished = True
            if self._usage is not None:
                self._usage.add(self.job.model, frame.prompt_tokens, frame.completion_tokens)
            return frame
        if isinstance(frame, Error):
            raise JobFailed(frame.status, frame.error)
        self._fail(JobFailed(502, f"worker {self.worker} sent a second head"))

    async def _receive(self) -> Frame:
        """The next frame of the current attempt that is neither ``Start`` nor ``Ping``, or
        the ``Liveness`` verdict on a job gone quiet."""
        while True:
            raw = await self._inbox.get(self._tick())
            if raw is None:
                if (verdict := await self._check()) is not None:
                    return verdict
                continue
            if raw == LOST:
                self._fail(RedisUnavailable("its Pub/Sub connection dropped"))
            try:
                frame = decode_frame(raw)
            except ProtocolError as exc:
                self._fail(JobFailed(502, str(exc)))
            if frame.attempt != self.job.attempt:
                continue  # from an attempt given up on
            if frame.seq != self._seq:
                self._fail(JobFailed(502, f"lost frames from worker {self.worker}"))
            self._seq += 1
            self._last_frame = time.monotonic()
            if isinstance(frame, Start):
                self.worker = frame.worker
                if self.job.model:
                    note_started(self.job.model, self._last_frame - self._enqueued)
            elif not isinstance(frame, Ping):
                return frame

    def _tick(self) -> float:
        deadline = self.job.deadline
        if self.worker is None and deadline is not None:
            return max(0.0, min(LIVENESS_TICK, deadline - time.time()))
        return LIVENESS_TICK

    async def _check(self) -> Error | None:
        if self.worker is None:
            now = time.monotonic()
            if self._liveness.takers(self.job):
                self._orphaned_since = None
            elif self._orphaned_since is None:
                self._orphaned_since = now
            orphaned = 0.0 if self._orphaned_since is None else now - self._orphaned_since
            return await self._liveness.waiting(
                self.job, self._message, now - self._enqueued, orphaned
            )
        return self._liveness.running(self.job, self.worker, time.monotonic() - self._last_frame)

    def _fail(self, error: ApiError) -> NoReturn:
        log.warning("job %s: %s", self.job.id, error.message)
        raise error
