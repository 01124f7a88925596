"""Running one job: claim it, forward it to Ollama, stream Ollama's bytes to the outbox."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.connections import raise_if_cancelling
from oshepherd.logs import request_id
from oshepherd.models import entry_model, normalize
from oshepherd.protocol import (
    MODEL_CHANGING_PATHS,
    START_SCRIPT,
    UNLOAD,
    Job,
    Start,
    cancel_key,
    started_key,
)
from oshepherd.tokens import NO_COUNTS, TokenMeter, UsageProbe
from oshepherd.worker.blobs import BlobRelay
from oshepherd.worker.ollama import OllamaHost, OllamaStreamBroke, OllamaUnreachable
from oshepherd.worker.outbox import Outbox
from oshepherd.worker.stats import Tally

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)

# How long an unload may take to show in the host's /api/ps: Ollama answers it at once and
# frees the model on its scheduler's loop just after (server/sched.go, expireRunner).
SHOW_PATH = "/api/show"  # the one model-bound request that does not load its model
UNLOAD_SETTLE = 2.0
SETTLE_POLL = 0.05


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
        is_loaded: Callable[[str], bool],
    ) -> None:
        self._redis = redis
        self._host = host
        self._worker_id = worker_id
        self._ping_interval = ping_interval
        self._on_unreachable = on_unreachable
        self._is_loaded = is_loaded
        self._on_models_changed = on_models_changed
        self._start = redis.register_script(START_SCRIPT)
        self._blobs = BlobRelay(redis, host, worker_id)
        self.tally = Tally(worker_id)  # the tokens of its jobs, written with the heartbeat
        self.in_flight: dict[str, asyncio.Task[None]] = {}

    async def run(self, job: Job) -> None:
        """Run ``job`` unless it is past its deadline or cancelled; its request's id is on
        every log line meanwhile (a task of its own: the id goes with it)."""
        request_id.set(job.request_id)
        log.debug("job %s: %s %s, attempt %d", job.id, job.method, job.path, job.attempt)
        if job.expired():
            log.info("job %s: past its deadline, skipped", job.id)
            return
        task = asyncio.current_task()
        assert task is not None
        self.in_flight[job.id] = task
        try:
            if await self._claim(job):
                raise_if_cancelling()
                await self._forward(job)
        except asyncio.CancelledError:
            log.info("job %s: cancelled by its client", job.id)
        except RedisError as exc:
            # The API lost the same Redis and fails the request on its side.
            log.warning("job %s: Redis failed: %r", job.id, exc)
        finally:
            del self.in_flight[job.id]

    async def _claim(self, job: Job) -> bool:
        start = Start(seq=0, attempt=job.attempt, worker=self._worker_id).encode()
        args: list[str | bytes | int] = [job.channel, start, job.attempt]
        if not await self._start(keys=[cancel_key(job.id), started_key(job.id)], args=args):
            log.info("job %s: cancelled, skipped", job.id)
            return False
        return True

    def cancel(self, job_id: str) -> bool:
        task = self.in_flight.get(job_id)
        if task is not None:
            task.cancel()
        return task is not None

    async def _forward(self, job: Job) -> None:
        outbox = Outbox(
            self._redis.publish, job.channel, job.attempt, ping_interval=self._ping_interval
        )
        pump = asyncio.create_task(outbox.pump())
        try:
            await (self._blobs.relay(job, outbox) if job.upload else self._relay(job, outbox))
            await pump
        finally:
            pump.cancel()

    async def _settle(self, job: Job, status: int) -> None:
        """After a load or unload: advertise what the host now has loaded, before the
        answer ends, so the API's ``/api/ps`` straight after is current. A model Ollama
        said it unloaded (``status`` 2xx) is first awaited out of the host's ``/api/ps``,
        for at most ``UNLOAD_SETTLE`` seconds."""
        if job.residency == UNLOAD and status < 300 and (model := _model_of(job.body)):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + UNLOAD_SETTLE
            while loop.time() < deadline:
                running = (await self._host.poll()).running
                if all(entry_model(entry) != model for entry in running):
                    break
                await asyncio.sleep(SETTLE_POLL)
        await self._on_models_changed()

    async def _relay(self, job: Job, outbox: Outbox) -> None:
        body, content_type = job.content()
        meter = TokenMeter.for_path(job.path)
        probe = UsageProbe.for_request(job.path, body) if not job.content_type else None
        try:
            sent = probe.body if probe is not None else body
            async with self._host.send(job.method, job.path, sent, content_type) as response:
                outbox.start(response.status, response.content_type)
                if not response.content_type.startswith("text/event-stream"):
                    probe = None  # an error: Ollama's JSON, as it wrote it
                async for chunk in response.chunks():
                    if meter is not None:
                        meter.feed(chunk)
                    outbox.write(probe.filter(chunk) if probe is not None else chunk)
                if probe is not None:
                    outbox.write(probe.rest())
                if job.path in MODEL_CHANGING_PATHS:
                    await self._on_models_changed()
                elif job.residency:
                    await self._settle(job, response.status)
                elif self._loaded_by(job, response.status):
                    # An unload straight after must find this host: advertise it first.
                    await self._on_models_changed()
                counts = meter.counts() if meter is not None else NO_COUNTS
                self.tally.add(job.model, counts)
                outbox.finish(counts)
        except OllamaUnreachable as exc:
            message = f"worker {self._worker_id} cannot reach its Ollama at {self._host.base_url}"
            log.warning("job %s: %s: %s", job.id, message, exc)
            await self._on_unreachable(message)
            outbox.fail(502, message, retry=True)
        except OllamaStreamBroke as exc:
            log.warning("job %s: %s", job.id, exc)
            outbox.fail(502, f"worker {self._worker_id}: {exc}")

    def _loaded_by(self, job: Job, status: int) -> bool:
        """Whether ``job`` just loaded its model on the host: it ran the model (any
        model-bound job but a show), succeeded, and the model was not loaded before."""
        return (
            bool(job.model)
            and job.path != SHOW_PATH
            and status < 300
            and not self._is_loaded(job.model)
        )


def _model_of(body: str) -> str:
    """The normalized model a generate or chat body names, or "" if none."""
    try:
        model = orjson.loads(body).get("model")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return normalize(model) if isinstance(model, str) else ""
