"""Routing: which queue a request waits on, and whether a failed job runs again.

``Dispatcher.submit`` finds the model in the registry, queues the job (one Lua call that
also enforces the queue's depth) and hands back the ``JobStream`` that follows it. The
stream calls back here to cancel the job and to ask for a re-run: a job whose worker died
before the client got a byte runs once more, on another worker.

A job waits on its tenant's queue of its model (``model_queue(model, tenant)``), in the list
of its caller's priority (``queue_key``): the workers' BRPOP takes the highest priority
first and goes round the tenants' queues within one (docs/scheduling.md).
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.api.auth import caller, check_model
from oshepherd.api.autopipeline import AutoPipeline
from oshepherd.api.errors import (
    ModelNotFound,
    NoHealthyWorker,
    QueueFull,
    RedisUnavailable,
    Unavailable,
)
from oshepherd.api.inbox import Inboxes
from oshepherd.api.jobstream import JobStream, Liveness
from oshepherd.api.registry import Registry
from oshepherd.config import ApiSettings
from oshepherd.logs import request_id
from oshepherd.models import normalize
from oshepherd.protocol import (
    CANCEL_ALL,
    CANCEL_CHANNEL,
    CANCEL_TTL,
    ENQUEUE_SCRIPT,
    PRIORITY_STEP,
    SUPERSEDE_SCRIPT,
    Job,
    cancel_key,
    celery_message,
    model_queue,
    new_id,
    queue_worker,
    started_key,
    worker_queue,
)

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

# Seconds a cancel that Redis refused (away, failing over) is retried: a failover takes a
# few seconds (docs/redis-ha.md); a job queued before it must not run after it.
CANCEL_RETRY_FOR = 60.0


class Dispatcher:
    def __init__(
        self, redis: Redis, inboxes: Inboxes, registry: Registry, settings: ApiSettings
    ) -> None:
        self._redis = redis
        self._pipeline = AutoPipeline(redis)  # the enqueues of a loop turn, as one write
        self._inboxes = inboxes
        self._registry = registry
        self._queue_timeout = settings.queue_timeout
        self._max_queue_depth = settings.max_queue_depth
        self._enqueue_script = redis.register_script(ENQUEUE_SCRIPT)
        self._supersede_script = redis.register_script(SUPERSEDE_SCRIPT)
        self._cancelling: set[asyncio.Task[None]] = set()  # cancels waiting for Redis
        self._liveness = Liveness(
            alive=registry.alive,
            supersede=self._supersede,
            takers=self._takers,
            revoked=self._revoked,
            queue_timeout=settings.queue_timeout,
            stall_timeout=settings.stall_timeout,
        )

    async def submit(
        self,
        method: str,
        path: str,
        body: str,
        model: str,
        *,
        residency: str = "",
        content_type: str = "",
    ) -> JobStream:
        """Queue a job for a worker holding ``model`` (as the client wrote it); ``residency``
        marks a load or unload (``Job.residency``), ``content_type`` a body that is not JSON
        (``Job.content_type``).

        Raises ``Forbidden`` when the caller's key may not use it, ``ModelNotFound`` when no
        live worker has it, ``NoHealthyWorker`` when none of those answers, ``QueueFull``
        and ``RedisUnavailable``.
        """
        name = normalize(model)
        check_model(name)
        if not self._registry.healthy_holders(name):
            await self.catch_up()
            if not self._registry.holders(name):
                if self._registry.rejoining:
                    raise Unavailable(f"model '{model}' is not listed: Redis is failing "
                                      "over or workers are registering again")  # fmt: skip
                raise ModelNotFound(model)
            if not self._registry.healthy_holders(name):
                raise NoHealthyWorker(model)
        return await self._start(
            method,
            path,
            body,
            model_queue(name, caller().tenant),
            model=name,
            residency=residency,
            content_type=content_type,
        )

    async def submit_to(
        self,
        worker_id: str,
        method: str,
        path: str,
        body: str,
        *,
        residency: str = "",
        upload: str = "",
    ) -> JobStream:
        """Queue a job for one worker (model management on its host); never re-run.
        ``upload`` names the blob upload whose items are the body (``Job.upload``)."""
        return await self._start(
            method, path, body, worker_queue(worker_id), residency=residency, upload=upload
        )

    async def catch_up(self) -> None:
        """Refresh the view unless a refresh began after this call (callers meanwhile share
        the next one): a miss then sees what another API process saw before it, such as a
        model just pulled through it. Raises ``RedisUnavailable``."""
        try:
            await self._registry.refresh_after(time.monotonic())
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc

    async def refresh_registry(self, max_age: float = 0.25) -> None:
        """Refresh the view if older than ``max_age`` seconds; raises ``RedisUnavailable``."""
        try:
            await self._registry.refresh_if_older(max_age)
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc

    async def _start(
        self,
        method: str,
        path: str,
        body: str,
        queue: str,
        *,
        model: str = "",
        residency: str = "",
        content_type: str = "",
        upload: str = "",
    ) -> JobStream:
        """Queue a job on ``queue`` (the optional fields are ``Job``'s), with the caller's
        tenant and priority."""
        job_id = new_id()
        channel = self._inboxes.channel(job_id)
        who = caller()
        job = Job(
            job_id, channel, method, path, body, model, None, queue=queue, residency=residency,
            content_type=content_type, upload=upload, tenant=who.tenant,
            priority=PRIORITY_STEP[who.priority], request_id=request_id.get(),
        )  # fmt: skip
        inbox = self._inboxes.open(job_id)  # before the job is queued: Pub/Sub keeps nothing
        try:
            message = await self._enqueue(job)
        except BaseException:
            inbox.close()
            raise
        return JobStream(
            job,
            message,
            inbox,
            liveness=self._liveness,
            cancel=self._cancel,
            rerun=self._rerun,
            usage=who.usage,
        )

    async def _enqueue(self, job: Job) -> bytes:
        """Queue ``job`` with a fresh deadline (none without ``QUEUE_TIMEOUT``) and queue
        time (``Job.queued``: negated when no host has its model loaded); its Celery
        message (to find it again). The request's first job is queued with its admission
        (``Admission.enqueue``): raises ``TooManyRequests`` past a key's limit, as well as
        ``QueueFull`` and ``RedisUnavailable``."""
        if not self._inboxes.is_ready:
            raise RedisUnavailable("reconnecting")
        now = time.time()
        timeout = self._queue_timeout
        job.deadline = None if timeout is None else now + timeout
        job.queued = now if self._registry.warm(job.model) else -now
        message = celery_message(job)
        admission = caller().admission
        try:
            depth = None
            if admission is not None and admission.pending:  # the request's limits, at once
                depth = await admission.enqueue(job.key, message, self._max_queue_depth)
            if depth is None:
                depth = await self._pipeline.run_script(
                    self._enqueue_script, [job.key], [message, self._max_queue_depth]
                )
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc
        if depth == -1:
            raise QueueFull()
        return message

    async def _rerun(self, job: Job, failed_on: str | None) -> bytes | None:
        """Queue the next attempt of a job that failed on ``failed_on`` before reaching
        Ollama: only a model-bound first attempt, and only when another healthy worker holds
        the model. The new attempt's message, or None."""
        if job.attempt > 0 or not job.model:
            return None
        await self.refresh_registry(max_age=0)  # the failed worker has re-registered
        if not any(w.id != failed_on for w in self._registry.healthy_holders(job.model)):
            return None
        log.warning("job %s: attempt %d failed on %s, re-running", job.id, job.attempt, failed_on)
        job.attempt += 1
        return await self._enqueue(job)

    async def _cancel(self, job: Job, message: bytes, before: int) -> None:
        """The client is gone or the job failed: it must never run, or run on.

        With ``before`` < ``CANCEL_ALL``, only attempts before it (one the API gave up on)
        are cancelled: no running worker is told, as the next attempt may be running.
        """
        try:
            await self._send_cancel(job, message, before)
        except RedisError as exc:
            # Redis is away (a restart, a failover): the job may still be queued there, or
            # on the new primary, and must not run once Redis is back. Keep trying.
            log.warning("job %s: could not cancel yet, retrying: %r", job.id, exc)
            task = asyncio.create_task(self._cancel_later(job, message, before))
            self._cancelling.add(task)
            task.add_done_callback(self._cancelling.discard)

    async def _cancel_later(self, job: Job, message: bytes, before: int) -> None:
        """Retry a cancel for up to ``CANCEL_RETRY_FOR`` seconds, backing off."""
        deadline = time.monotonic() + CANCEL_RETRY_FOR
        delay = 0.25
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await self._send_cancel(job, message, before)
            except RedisError:
                delay = min(2 * delay, 2.0)
                continue
            log.info("job %s: cancelled once Redis answered", job.id)
            return
        log.warning("job %s: could not cancel within %.0f s", job.id, CANCEL_RETRY_FOR)

    async def _send_cancel(self, job: Job, message: bytes, before: int) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(cancel_key(job.id), before, ex=CANCEL_TTL)
            if before == CANCEL_ALL:
                pipe.publish(CANCEL_CHANNEL, job.id)
            pipe.lrem(job.key, 1, message)  # type: ignore[arg-type]  # bytes are fine
            await pipe.execute()

    def _takers(self, job: Job) -> bool:
        """Whether a live worker could take ``job``: one holding its model, or its target.
        None could for a tenant that no longer exists (its key revoked): the workers stop
        consuming its queues."""
        if self._revoked(job):
            return False
        target = queue_worker(job.queue)
        if target is not None:
            return self._registry.alive(target)
        return any(self._registry.alive(w.id) for w in self._registry.holders(job.model))

    def _revoked(self, job: Job) -> bool:
        """Whether ``job``'s tenant (its key) no longer exists."""
        return bool(job.tenant) and job.tenant not in self._registry.tenants

    async def _supersede(self, job: Job, message: bytes) -> bool:
        """Forbid ``job``'s attempt to start if it has left its queue without starting
        (``SUPERSEDE_SCRIPT``); whether it did so (a Redis error counts as no)."""
        keys = [job.key, cancel_key(job.id), started_key(job.id)]
        try:
            return bool(await self._supersede_script(keys=keys, args=[message, job.attempt]))
        except RedisError as exc:
            log.warning("job %s: could not look at its queue: %r", job.id, exc)
            return False
