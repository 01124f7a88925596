"""A request's life as a job: route, enqueue, then follow its frames to the end.

``Dispatcher.submit`` routes and enqueues; ``JobStream.next`` turns the raw frames into
what the response needs (head, data, end, error) and deals with everything else on the
way: the queue deadline, pings, gaps, a stalled or vanished worker, and the single re-run
of a job whose worker died before the client got a byte.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.api.errors import ApiError
from oshepherd.api.hub import LOST, Hub
from oshepherd.api.registry import Registry
from oshepherd.config import ApiSettings
from oshepherd.models import normalize
from oshepherd.protocol import (
    CANCEL_ALL,
    CANCEL_CHANNEL,
    Frame,
    Job,
    ProtocolError,
    cancel_key,
    celery_message,
    decode_frame,
    encode_frame,
    model_queue,
    new_id,
    worker_queue,
)

__all__ = ["Dispatcher", "JobStream"]

log = logging.getLogger(__name__)

# Backpressure and enqueue in one round trip. KEYS: queue. ARGV: message, max depth.
ENQUEUE_SCRIPT = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""
BUSY = "server busy, please try again.  maximum pending requests exceeded"
CANCEL_TTL = 3600
LIVENESS_TICK = 1.0
# A job gone from its queue that no worker has reported starting this long after it was
# queued was lost with its worker (taken, then killed before it could start).
LOST_AFTER = 3.0


def _redis_down(exc: RedisError) -> ApiError:
    return ApiError(503, f"the gateway cannot reach Redis: {exc}", retry_after=5)


class Dispatcher:
    def __init__(self, redis: Redis, hub: Hub, registry: Registry, settings: ApiSettings) -> None:
        self.redis = redis
        self.hub = hub
        self.registry = registry
        self.settings = settings
        self._enqueue = redis.register_script(ENQUEUE_SCRIPT)

    async def submit(self, method: str, path: str, body: str, model: str) -> JobStream:
        """Queue a job for a worker holding ``model``; 404 when no live worker has it."""
        name = normalize(model)
        if not self.registry.healthy_holders(name):
            await self.refresh_registry()
            if not self.registry.holders(name):
                raise ApiError(404, f"model '{model}' not found")
            if not self.registry.healthy_holders(name):
                raise ApiError(503, f"no healthy worker has model '{model}'", retry_after=5)
        return await self._start(method, path, body, name, model_queue(name))

    async def submit_to(self, worker_id: str, method: str, path: str, body: str) -> JobStream:
        """Queue a job for one worker (model management on its host); never re-run."""
        return await self._start(method, path, body, "", worker_queue(worker_id))

    async def _start(self, method: str, path: str, body: str, model: str, queue: str) -> JobStream:
        job_id = new_id()
        job = Job(job_id, self.hub.channel(job_id), method, path, body, model, 0.0, queue=queue)
        stream = JobStream(self, job)
        await stream.enqueue()
        return stream

    async def refresh_registry(self, max_age: float = 0.25) -> None:
        """Refresh the view if older than ``max_age`` seconds; Redis trouble becomes a 503."""
        try:
            await self.registry.refresh_if_older(max_age)
        except RedisError as exc:
            raise _redis_down(exc) from None

    async def enqueue(self, job: Job, message: bytes) -> None:
        if not self.hub.is_ready:
            raise ApiError(503, "the gateway is reconnecting to Redis", retry_after=2)
        try:
            depth = await self._enqueue(
                keys=[job.queue], args=[message, self.settings.max_queue_depth]
            )
        except RedisError as exc:
            raise _redis_down(exc) from None
        if depth == -1:
            raise ApiError(503, BUSY, retry_after=5)

    async def cancel(self, job: Job, message: bytes, *, before: int = CANCEL_ALL) -> None:
        """The client is gone or the deadline passed: the job must never run (or run on).

        With ``before``, only attempts before it (one the API gave up on) are cancelled: no
        running worker is told, as the next attempt may already be running.
        """
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(cancel_key(job.id), before, ex=CANCEL_TTL)
                if before == CANCEL_ALL:
                    pipe.publish(CANCEL_CHANNEL, job.id)
                pipe.lrem(job.queue, 1, message)  # type: ignore[arg-type]  # bytes are fine
                await pipe.execute()
        except RedisError as exc:
            log.warning("job %s: could not cancel: %r", job.id, exc)

    async def queued(self, job: Job, message: bytes) -> bool:
        """Whether ``message`` still waits in its queue (an error counts as yes)."""
        try:
            return await self.redis.lpos(job.queue, message) is not None  # type: ignore[arg-type]
        except RedisError as exc:
            log.warning("job %s: could not look at its queue: %r", job.id, exc)
            return True


class JobStream:
    """The frames of one job, as the response consumes them."""

    def __init__(self, dispatcher: Dispatcher, job: Job) -> None:
        self._d = dispatcher
        self.job = job
        self.worker: str | None = None
        self._queue = dispatcher.hub.open(job.id)
        self._message = b""
        self._seq = 0
        self._last_frame = 0.0
        self._enqueued = 0.0
        self._headed = False
        self.finished = False

    async def enqueue(self) -> None:
        self.job.deadline = time.time() + self._d.settings.queue_timeout
        self._enqueued = time.monotonic()
        self._message = celery_message(self.job)
        self._seq, self.worker = 0, None
        try:
            await self._d.enqueue(self.job, self._message)
        except ApiError:
            self._d.hub.close(self.job.id)
            raise

    async def close(self) -> None:
        """Release the job; if it did not finish, make sure it stops."""
        self._d.hub.close(self.job.id)
        if not self.finished:
            await self._d.cancel(self.job, self._message)

    async def next(self) -> Frame:
        """Before the head: the head, or ``ApiError``. After it: data, end or error."""
        while True:
            frame = await self._receive()
            if frame.kind == "error" and not self._headed:
                if frame.meta.get("retry") and await self._rerun():
                    continue
                self.finished = True
                raise ApiError(int(frame.meta.get("status", 502)), str(frame.meta.get("error")))
            if frame.kind == "head":
                self._headed = True
                self.finished = bool(frame.meta.get("last"))
            elif frame.kind in ("end", "error"):
                self.finished = True
            return frame

    async def _receive(self) -> Frame:
        """The next frame that matters (not start/ping), in order, or a synthesized error."""
        while True:
            raw = await self._get()
            if raw is None:
                continue
            if raw == LOST:
                return await self._fail(503, "the gateway lost its connection to Redis")
            try:
                frame = decode_frame(raw)
            except ProtocolError as exc:
                return await self._fail(502, str(exc))
            if frame.attempt != self.job.attempt:
                continue
            if frame.seq != self._seq:
                return await self._fail(502, f"lost frames from worker {self.worker}")
            self._seq += 1
            self._last_frame = time.monotonic()
            if frame.kind == "start":
                self.worker = str(frame.meta.get("worker"))
            elif frame.kind != "ping":
                return frame

    async def _get(self) -> bytes | None:
        """A raw frame, or None after a liveness tick with nothing to report."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        try:
            async with asyncio.timeout(self._tick()):
                return await self._queue.get()
        except TimeoutError:
            await self._check_liveness()
            return None

    def _tick(self) -> float:
        if self.worker is None:
            return max(0.0, min(LIVENESS_TICK, self.job.deadline - time.time()))
        return LIVENESS_TICK

    async def _check_liveness(self) -> None:
        if self.worker is None:
            await self._check_waiting()
            return
        if not self._d.registry.alive(self.worker):
            self._queue.put_nowait(self._synthetic(502, f"worker {self.worker} went away"))
        elif time.monotonic() - self._last_frame > self._d.settings.stall_timeout:
            self._queue.put_nowait(self._synthetic(504, f"worker {self.worker} stalled"))

    async def _check_waiting(self) -> None:
        """A job not started yet: past its deadline, or lost by a worker that died with it."""
        if time.time() >= self.job.deadline:
            await self._d.cancel(self.job, self._message)
            self.finished = True
            timeout = self._d.settings.queue_timeout
            raise ApiError(503, f"no worker could take the job within {timeout:g}s", retry_after=5)
        if time.monotonic() - self._enqueued < LOST_AFTER or await self._d.queued(
            self.job, self._message
        ):
            return
        log.warning(
            "job %s: attempt %d left its queue but never started", self.job.id, self.job.attempt
        )
        # Should the worker start it after all, the start script refuses it.
        await self._d.cancel(self.job, self._message, before=self.job.attempt + 1)
        self._queue.put_nowait(self._synthetic(502, "the worker that took the job went away"))

    def _synthetic(self, status: int, error: str) -> bytes:
        meta = {"status": status, "error": error, "retry": status == 502}
        return encode_frame(Frame("error", self._seq, self.job.attempt, meta=meta))

    async def _fail(self, status: int, error: str) -> Frame:
        if not self._headed:
            self.finished = True
            raise ApiError(status, error, retry_after=2)
        return Frame("error", self._seq, self.job.attempt, meta={"status": status, "error": error})

    async def _rerun(self) -> bool:
        """Re-run once on another worker, when the client has received nothing yet."""
        if self.job.attempt > 0 or not self.job.model:
            return False
        await self._d.refresh_registry(max_age=0)  # the failed worker has re-registered
        others = [
            w for w in self._d.registry.healthy_holders(self.job.model) if w.id != self.worker
        ]
        if not others:
            return False
        log.warning(
            "job %s: attempt %d failed on %s, re-running",
            self.job.id,
            self.job.attempt,
            self.worker,
        )
        self.job.attempt += 1
        await self.enqueue()
        return True
