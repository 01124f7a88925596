"""The API's in-memory view of the live workers and of the tenants, refreshed from Redis
about once a second."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.models import entry_model
from oshepherd.protocol import TENANTS, WORKERS_INDEX, ProtocolError, WorkerEntry, worker_key

__all__ = ["Registry"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a worker's registry entry lives (3 heartbeats of WorkerSettings' default), for an
# entry that does not say (no ``last_seen``: an older worker).
DEFAULT_ENTRY_TTL = 6.0
# Seconds between two refreshes a miss asks for (``Registry.refresh_after``).
MISS_REFRESH_GAP = 0.25


class Registry:
    def __init__(self, redis: Redis, *, refresh: float) -> None:
        self._redis = redis
        self._interval = refresh
        self._refreshed = 0.0
        self._began = 0.0  # when the last refresh began (monotonic)
        self._lock = asyncio.Lock()
        self.workers: dict[str, WorkerEntry] = {}
        self._holders: dict[str, list[WorkerEntry]] = {}
        self._healthy_holders: dict[str, list[WorkerEntry]] = {}
        self._healthy: list[WorkerEntry] = []
        self._derived: dict[str, Any] = {}  # see ``derived``
        self._warm: frozenset[str] = frozenset()  # models loaded on a healthy worker's host
        # Key ids that exist (``TENANTS``): a job of any other tenant has no taker.
        self.tenants: frozenset[str] = frozenset()
        self._outage_ttl: float | None = None  # Redis lost: the longest entry TTL known then
        self._rejoin_until = 0.0  # monotonic; see ``rejoining``

    async def run_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except RedisError as exc:
                log.warning("registry refresh failed: %r", exc)
                if self._outage_ttl is None:
                    self._outage_ttl = max(map(_ttl, self.workers.values()), default=0.0)
                self._forget_expired()
            await asyncio.sleep(self._interval)

    @property
    def rejoining(self) -> bool:
        """Redis is out (the last periodic refresh failed), or answers again after an outage
        (a failover, a restart) since less time than the registry entries known before it
        lived: workers whose entries expired meanwhile register again within a heartbeat,
        so a model missing from the view may be back in a moment (a 503, not a 404)."""
        return self._outage_ttl is not None or time.monotonic() < self._rejoin_until

    def _answered(self) -> None:
        """A refresh read Redis: an outage, if any, is over."""
        if self._outage_ttl is not None:
            self._rejoin_until = time.monotonic() + self._outage_ttl
            self._outage_ttl = None

    async def refresh(self) -> None:
        async with self._lock:
            await self._refresh()

    async def refresh_after(self, moment: float) -> None:
        """Refresh unless a refresh that began after ``moment`` (monotonic) has ended; callers
        that wait meanwhile share the next one. The view is then at least as new as Redis was
        at ``moment``: what another API process changed before (a pull through it) shows.

        Such refreshes begin at most every ``MISS_REFRESH_GAP`` seconds (a miss waits at most
        that long): a flood of requests for models nobody has must not turn into a flood of
        full registry reads, which grow with the fleet (docs/scale.md).
        """
        async with self._lock:
            if self._began <= moment:
                wait = self._began + MISS_REFRESH_GAP - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._refresh()

    async def _refresh(self) -> None:
        self._began = time.monotonic()
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(WORKERS_INDEX, now, "+inf")
            pipe.smembers(TENANTS)
            ids, tenants = await pipe.execute()
        self.tenants = frozenset(t.decode() for t in tenants if isinstance(t, bytes))
        keys = [worker_key(i.decode()) for i in ids if isinstance(i, bytes)]
        raw = await self._redis.mget(keys) if keys else []
        workers = {}
        for item in raw:
            if item is None:
                continue
            try:
                entry = WorkerEntry.from_json(item)
            except ProtocolError as exc:
                log.warning("ignoring a registry entry: %s", exc)
                continue
            workers[entry.id] = entry
        self._answered()
        self._install(workers)
        self._refreshed = time.monotonic()

    @property
    def current(self) -> bool:
        """Refreshed from Redis within the last three refresh intervals (at least 3 s)."""
        return time.monotonic() - self._refreshed <= max(3 * self._interval, 3.0)

    async def refresh_if_older(self, age: float) -> None:
        """Refresh now unless the view is younger than ``age`` seconds (a cheap miss path)."""
        if time.monotonic() - self._refreshed > age:
            await self.refresh()

    def _install(self, workers: dict[str, WorkerEntry]) -> None:
        """Take ``workers`` as the view, with the indexes the request path reads: built once
        per refresh (O(entries)), so that a request costs the same whatever the fleet."""
        holders: dict[str, list[WorkerEntry]] = {}
        for entry in workers.values():
            for name in {entry_model(m) for m in entry.models}:
                holders.setdefault(name, []).append(entry)
        self.workers = workers
        self._holders = holders
        self._healthy_holders = {
            name: healthy for name, held in holders.items() if (healthy := _healthy(held))
        }
        self._healthy = sorted(_healthy(workers.values()), key=lambda w: w.id)
        self._warm = frozenset(
            entry_model(m) for w in workers.values() if w.healthy for m in w.running
        )
        self._derived = {}

    def derived(self, name: str, build: Callable[[], T]) -> T:
        """``build()``'s result, kept under ``name`` until the view changes (a view of the
        fleet that a route would otherwise rebuild on every request, such as /api/tags's
        merged list). ``build`` reads only the registry; its result is shared, never
        mutated."""
        if name not in self._derived:
            self._derived[name] = build()
        return cast(T, self._derived[name])

    def _forget_expired(self) -> None:
        now = time.time()
        self._install({k: w for k, w in self.workers.items() if w.expires > now})

    def healthy(self) -> list[WorkerEntry]:
        """Every worker whose host answers, by id (a copy: the caller's to keep)."""
        return list(self._healthy)

    def holders(self, model: str) -> list[WorkerEntry]:
        """Workers whose host has ``model`` (normalized), healthy or not."""
        return self._holders.get(model, [])

    def healthy_holders(self, model: str) -> list[WorkerEntry]:
        """Workers whose host has ``model`` (normalized) and answers (shared: read only)."""
        return self._healthy_holders.get(model, [])

    def warm(self, model: str) -> bool:
        """Whether a healthy worker's host has ``model`` (normalized) loaded (its /api/ps)."""
        return model in self._warm

    def alive(self, worker_id: str) -> bool:
        entry = self.workers.get(worker_id)
        return entry is not None and entry.expires > time.time()


def _healthy(workers: Iterable[WorkerEntry]) -> list[WorkerEntry]:
    return [w for w in workers if w.healthy]


def _ttl(entry: WorkerEntry) -> float:
    """How long ``entry`` lives after each heartbeat (seconds)."""
    return entry.expires - entry.last_seen if entry.last_seen else DEFAULT_ENTRY_TTL
