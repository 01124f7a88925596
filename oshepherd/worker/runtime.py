"""The worker's event loop: jobs, heartbeats, host polling and cancellation, on one thread.

Celery's pool threads are only slots: each hands its job to this loop and waits. All I/O
(Ollama over one keep-alive pool, Redis) happens here, so a silent Ollama can be pinged
over and a cancelled job's HTTP request closed at once.

It also decides which queues the Celery consumer follows (``model_queues``): for each model
the host has, the queue of tenant "" and of every tenant in ``TENANTS``. Those of models the
host has loaded at once; those of the others (cold: the host would load the model first)
only while a job on them has waited ``WARM_WAIT`` for a warm host (docs/scheduling.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

import uvloop
from redis.exceptions import RedisError

from oshepherd.config import WorkerSettings
from oshepherd.connections import async_redis
from oshepherd.models import entry_model
from oshepherd.protocol import (
    CANCEL_CHANNEL,
    OLDEST_SCRIPT,
    PRIORITY_STEPS,
    TENANTS,
    WORKERS_INDEX,
    Job,
    WorkerEntry,
    model_queue,
    queue_key,
    worker_key,
)
from oshepherd.worker.jobs import JobRunner
from oshepherd.worker.ollama import HostState, OllamaHost

__all__ = ["WorkerRuntime"]

log = logging.getLogger(__name__)

# Seconds between two looks at the cold models' queues (only while a slot is free): this
# often while a look found a job waiting on one of them, ``COLD_POLL_IDLE`` after a look
# that found them all empty. The idle pace is below the default WARM_WAIT (0.3 s) less
# COLD_POLL, so a job that waits for a warm host is seen before it is due and taken as
# soon as before; a job that no host had loaded waits at most that much longer. Idle, a
# worker's look costs Redis one EVALSHA and one LINDEX per list: measured at 87 commands/s
# per idle worker with one cold model at 0.05 s (bench fleet100).
COLD_POLL = 0.05
COLD_POLL_IDLE = 0.25


class WorkerRuntime:
    """Owns the loop thread. ``run`` is called from Celery's pool threads."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="oshepherd-io", daemon=True
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._state = HostState(error="not polled yet")
        self._loaded: frozenset[str] = frozenset()  # models the host has in memory
        self._held: frozenset[str] = frozenset()  # models whose queues it may follow
        self._tenants: frozenset[str] = frozenset({""})  # "" and the TENANTS set
        self._due: frozenset[str] = frozenset()  # cold models with a job past WARM_WAIT
        self._started_at = time.time()
        self._draining = False
        self._polled = asyncio.Event()
        self._poll_lock = asyncio.Lock()
        # Read by the Celery consumer thread; replaced whole, never mutated.
        self.model_queues: frozenset[str] = frozenset()

    # -- lifecycle (called from the main thread) --------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._call(self._setup())

    def stop(self) -> None:
        self._call(self._teardown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def drain(self) -> None:
        """Stop taking jobs; in-flight jobs get ``shutdown_timeout`` to finish."""
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

    def run(self, job: dict[str, Any]) -> None:
        """Run one job to its end (blocks the calling pool thread, not the loop)."""
        self._call(self.runner.run(Job.from_dict(job)))

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # -- on the loop ------------------------------------------------------------------
    async def _setup(self) -> None:
        self.redis = async_redis(self.settings.redis, socket_connect_timeout=2)
        self.host = OllamaHost(self.settings.ollama_base_url)
        self.runner = JobRunner(
            self.redis,
            self.host,
            worker_id=self.worker_id,
            ping_interval=self.settings.ping_interval,
            on_unreachable=self._mark_unreachable,
            on_models_changed=self._poll,
            is_loaded=lambda model: model in self._loaded,
        )
        self._tasks = [
            asyncio.create_task(self._poll_forever()),
            asyncio.create_task(self._heartbeat_forever()),
            asyncio.create_task(self._listen_for_cancels()),
            asyncio.create_task(self._watch_cold_forever()),
        ]
        # Serve from the first moment: the first poll decides which queues to consume.
        await asyncio.wait_for(self._polled.wait(), timeout=15)

    async def _teardown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._deregister()
        await self.host.aclose()
        await self.redis.aclose()

    async def _drain(self) -> None:
        self._draining = True
        self._follow()
        await self._register_quietly()  # advertise no models: no new jobs, still alive
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self.runner.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for job_id in list(self.runner.in_flight):
            log.warning("job %s: still running at shutdown, cancelled", job_id)
            self.runner.cancel(job_id)

    async def _heartbeat_forever(self) -> None:
        """Proof of life, on its own clock: a slow Ollama must not make the worker look dead
        (the API would cut its streams off and re-run its jobs)."""
        await self._polled.wait()
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            await self._register_quietly()

    async def _poll_forever(self) -> None:
        while True:
            await self._poll()
            self._polled.set()
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _poll(self) -> None:
        """Read the host's state and advertise it (also at once after a pull or delete)."""
        # One at a time: an older poll finishing last would advertise a deleted model again.
        async with self._poll_lock:
            self._observe(await self.host.poll())
            await self._read_tenants()
            await self._register_quietly()

    async def _read_tenants(self) -> None:
        """The tenants whose queues to follow (a Redis error keeps the last set)."""
        try:
            members = await self.redis.smembers(TENANTS)  # type: ignore[misc]
        except RedisError as exc:
            log.warning("could not read the tenants: %r", exc)
            return
        self._tenants = frozenset({"", *(m.decode() for m in members if isinstance(m, bytes))})
        self._follow()

    def _observe(self, state: HostState) -> None:
        if not state.healthy:
            # Keep advertising what the host had: its models are unavailable, not unknown
            # (503 with Retry-After, not 404).
            state.models, state.running = self._state.models, []
        if state.healthy and not self._state.healthy:
            log.info(
                "Ollama at %s answers (version %s)", self.settings.ollama_base_url, state.version
            )
        elif not state.healthy and state.error != self._state.error:  # the first poll too
            log.warning(
                "Ollama at %s is unreachable: %s", self.settings.ollama_base_url, state.error
            )
        self._state = state
        self._loaded = frozenset(entry_model(m) for m in state.running)
        held = {entry_model(m) for m in state.models} if state.healthy else set()
        self._held = frozenset(held)
        self._follow()

    def _follow(self) -> None:
        """Set the queues to consume: every tenant's queue of the warm models (held and
        loaded) and of the cold ones that are due; none while draining."""
        models = set() if self._draining else (self._held & self._loaded) | self._due
        queues = frozenset(model_queue(m, t) for m in models for t in self._tenants)
        if queues != self.model_queues:
            self.model_queues = queues

    async def _watch_cold_forever(self) -> None:
        """Every ``COLD_POLL`` seconds (``COLD_POLL_IDLE`` while their queues are empty),
        while a slot is free, find the cold models with a job that has waited ``WARM_WAIT``
        (or was queued when no host had the model loaded: ``Job.queued`` negative): the
        consumer follows their queues until none has."""
        script = self.redis.register_script(OLDEST_SCRIPT)
        waiting = False  # whether the last look found a job on a cold queue
        while True:
            await asyncio.sleep(COLD_POLL if waiting else COLD_POLL_IDLE)
            cold = sorted(self._held - self._loaded)
            due: frozenset[str] = frozenset()
            waiting = False
            if cold and len(self.runner.in_flight) < self.settings.concurrency:
                try:
                    due, waiting = await self._due_models(script, cold)
                except RedisError as exc:
                    log.warning("could not look at the cold queues: %r", exc)
            if due != self._due:
                self._due = due
                self._follow()

    async def _due_models(self, script: Any, cold: list[str]) -> tuple[frozenset[str], bool]:
        """The models of ``cold`` whose oldest waiting job is due for a cold host, and
        whether any job waits on their queues at all."""
        tenants = sorted(self._tenants)
        per_model = len(tenants) * len(PRIORITY_STEPS)
        keys = [
            queue_key(model_queue(m, t), step)
            for m in cold
            for t in tenants
            for step in PRIORITY_STEPS
        ]
        stamps = await script(keys=keys)
        since = time.time() - self.settings.warm_wait
        due = frozenset(
            model
            for i, model in enumerate(cold)
            if any(
                stamp is not None and float(stamp) <= since
                for stamp in stamps[i * per_model : (i + 1) * per_model]
            )
        )
        return due, any(stamp is not None for stamp in stamps)

    async def _mark_unreachable(self, message: str) -> None:
        """A job could not reach Ollama: stop taking jobs until the next poll succeeds.

        Registered before the job reports its failure, so the API, when it refreshes its
        view to decide where to re-run the job, already sees this worker as unhealthy.
        """
        self._observe(HostState(healthy=False, error=message))
        await self._register_quietly()

    async def _register_quietly(self) -> None:
        try:
            await self._register()
        except RedisError as exc:
            log.warning("heartbeat failed: %r", exc)

    async def _register(self) -> None:
        ttl = self.settings.registry_ttl
        now = time.time()
        entry = WorkerEntry(
            id=self.worker_id,
            hostname=socket.gethostname(),
            ollama_url=self.settings.ollama_base_url,
            version=self._state.version,
            healthy=self._state.healthy,
            error=self._state.error,
            models=[] if self._draining else self._state.models,
            running=self._state.running,
            slots=self.settings.concurrency,
            in_flight=len(self.runner.in_flight),
            started_at=self._started_at,
            expires=now + ttl,
            cloud=self._state.cloud,
            last_seen=now,
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(self.worker_id), entry.to_json(), px=int(ttl * 1000))
            pipe.zadd(WORKERS_INDEX, {self.worker_id: now + ttl})
            pipe.zremrangebyscore(WORKERS_INDEX, "-inf", now)
            await self._execute_with_tally(pipe)

    async def _deregister(self) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(worker_key(self.worker_id))
                pipe.zrem(WORKERS_INDEX, self.worker_id)
                await self._execute_with_tally(pipe)
        except RedisError as exc:
            log.warning("could not remove the registry entry: %r", exc)

    async def _execute_with_tally(self, pipe: Any) -> None:
        """Run the registry's ``pipe`` with the tokens counted since the last one
        (``oshepherd.worker.stats``): no round trip of their own; kept for the next on a
        Redis error."""
        taken = self.runner.tally.flush(pipe)
        try:
            await pipe.execute()
        except RedisError:
            self.runner.tally.restore(taken)
            raise

    async def _listen_for_cancels(self) -> None:
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    async for message in pubsub.listen():
                        if self.runner.cancel(message["data"].decode()):
                            log.info("job %s: cancel received", message["data"].decode())
            except RedisError as exc:
                log.warning("cancel listener lost Redis, retrying: %r", exc)
                await asyncio.sleep(1)
