"""Running one job: claim it, forward it to Ollama, stream Ollama's bytes back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.protocol import Frame, Job, cancel_key, encode_frame
from oshepherd.worker.ollama import TRANSPORT_ERRORS, OllamaHost
from oshepherd.worker.outbox import Outbox

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)

# Skip a cancelled job (or an attempt the API has given up on), else tell the API who took
# it: one round trip. KEYS: cancel. ARGV: channel, start frame, attempt.
START_SCRIPT = """
local first = redis.call('GET', KEYS[1])
if first and tonumber(ARGV[3]) < tonumber(first) then return 0 end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
# Requests that change what the host holds: the registry must know before the client does.
MANAGEMENT_PATHS = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})


class JobRunner:
    """Runs jobs on the worker's event loop; every job shares one Ollama connection pool."""

    def __init__(
        self,
        redis: Redis,
        host: OllamaHost,
        *,
        worker_id: str,
        ping_interval: float,
        on_unreachable: Callable[[str], Awaitable[None]],
        on_models_changed: Callable[[], Awaitable[None]],
    ) -> None:
        self._redis = redis
        self._host = host
        self._worker_id = worker_id
        self._ping_interval = ping_interval
        self._on_unreachable = on_unreachable
        self._on_models_changed = on_models_changed
        self._start = redis.register_script(START_SCRIPT)
        self.in_flight: dict[str, asyncio.Task[None]] = {}

    async def run(self, job: Job) -> None:
        """Run ``job`` unless it is past its deadline or cancelled."""
        if job.expired():
            log.info("job %s: past its deadline, skipped", job.id)
            return
        task = asyncio.current_task()
        assert task is not None
        self.in_flight[job.id] = task
        try:
            if await self._claim(job):
                # redis-py (8.1) can lose a cancel that lands while a command runs.
                if task.cancelling():
                    raise asyncio.CancelledError
                await self._forward(job)
        except asyncio.CancelledError:
            log.info("job %s: cancelled by its client", job.id)
        except RedisError as exc:
            # The API lost the same Redis and fails the request on its side.
            log.warning("job %s: Redis failed: %r", job.id, exc)
        finally:
            del self.in_flight[job.id]

    async def _claim(self, job: Job) -> bool:
        start = encode_frame(Frame("start", 0, job.attempt, meta={"worker": self._worker_id}))
        args: list[str | bytes | int] = [job.channel, start, job.attempt]
        if not await self._start(keys=[cancel_key(job.id)], args=args):
            log.info("job %s: cancelled, skipped", job.id)
            return False
        return True

    def cancel(self, job_id: str) -> bool:
        task = self.in_flight.get(job_id)
        if task is not None:
            task.cancel()
        return task is not None

    async def _forward(self, job: Job) -> None:
        outbox = Outbox(self._redis, job.channel, job.attempt, ping_interval=self._ping_interval)
        pump = asyncio.create_task(outbox.pump())
        try:
            await self._read(job, outbox)
            await pump
        finally:
            pump.cancel()

    async def _read(self, job: Job, outbox: Outbox) -> None:
        request = self._host.request(job.method, job.path, job.body)
        try:
            response = await request.__aenter__()
        except TRANSPORT_ERRORS as exc:
            message = f"worker {self._worker_id} cannot reach its Ollama at {self._host.base_url}"
            log.warning("job %s: %s: %r", job.id, message, exc)
            await self._on_unreachable(message)
            outbox.fail(502, message, retry=True)
            return
        try:
            outbox.start(response.status, response.headers.get("Content-Type", ""))
            async for chunk in response.content.iter_any():
                outbox.write(chunk)
            if job.path in MANAGEMENT_PATHS:
                await self._on_models_changed()
            outbox.finish()
        except TRANSPORT_ERRORS as exc:
            log.warning("job %s: Ollama stream broke: %r", job.id, exc)
            outbox.fail(502, f"worker {self._worker_id}: Ollama stream broke: {exc!r}")
        finally:
            response.release()
