"""Limits per API key, enforced across every API replica: their state lives in Redis and
changes atomically.

* ``max_concurrent``: requests running or queued. Each admitted request holds a lease in
  the key's zset (``protocol.lease_key``), scored with its expiry: ``lease_ttl`` seconds,
  renewed every third of that while the request lives, removed when it ends. The lease of
  an API process that died expires on its own.
* ``rpm``: requests per minute, by pyrate-limiter's GCRA (its algorithm and Lua script,
  its state one hash per key, as its ``RedisStateStore`` keeps it): up to ``rpm`` at once,
  then one every ``60 / rpm`` seconds.
* ``tokens_per_day``: prompt plus completion tokens per UTC day. Checked before admission;
  counted after the request from its jobs' final frames (``oshepherd.usage.Usage``), so a
  request that starts under the budget may end past it.

The budget and the concurrency limit are checked and the lease taken by one Lua script
(``protocol.ADMIT_SCRIPT``), run with the rate's in one script
(``protocol.admission_script``): admission costs one EVALSHA. The rate counts attempts: a
request refused for its budget or concurrency spends a unit of it too; one refused for its
rate gives its lease back in the same script. Past a limit the
request gets ``TooManyRequests``
(429, ``Retry-After``) with its ``code``: ``token_budget_exhausted`` (retry at the next UTC
midnight), ``concurrency_limited`` (1 s) or ``rate_limited`` (when GCRA allows the next).

Limits apply to the inference routes (``INFERENCE_PATHS``). ``Admission.close`` releases the
lease and writes the request's usage (``oshepherd.usage``) after the response, off its path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyrate_limiter import GCRA, Duration, Rate
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from oshepherd import usage
from oshepherd.api.errors import RedisUnavailable, TooManyRequests
from oshepherd.keys import ApiKey
from oshepherd.protocol import (
    BUDGET_TTL,
    admission_script,
    budget_key,
    lease_key,
    new_id,
    rate_key,
)

if TYPE_CHECKING:
    from oshepherd.api.auth import Caller

__all__ = ["INFERENCE_PATHS", "Admission", "Limiter"]

log = logging.getLogger(__name__)

INFERENCE_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/audio/transcriptions",
    }
)
ADMITTED, OVER_BUDGET, TOO_MANY = 0, 1, 2  # ADMIT_SCRIPT's answers
CONCURRENCY_RETRY = 1  # seconds: when a running request may have ended
_GCRA = GCRA()
_SCRIPT = admission_script(_GCRA.redis_script() or "")


@dataclass(slots=True)
class Admission:
    """A request let through: ``close`` it when the request ends (it releases the lease
    and records the usage, in the background)."""

    limiter: Limiter
    tenant: str
    key: ApiKey | None
    usage: usage.Usage
    lease: str = ""
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.limiter.finish(self)


class Limiter:
    """One API process's side of the limits; ``start`` it with the process's Redis."""

    def __init__(self, *, lease_ttl: float) -> None:
        self._lease_ttl = lease_ttl
        self._redis: Redis | None = None
        self._leases: dict[str, str] = {}  # live lease id -> its zset
        self._ids = itertools.count()
        self._prefix = new_id()[:12] + ":"
        self._sha: str | None = None  # _SCRIPT's, once loaded
        self._rates: dict[int, list[Any]] = {}  # rpm -> GCRA's arguments after the header
        self._writes: set[asyncio.Task[None]] = set()
        self._renewing: asyncio.Task[None] | None = None

    def start(self, redis: Redis) -> None:
        self._redis = redis
        self._renewing = asyncio.create_task(self._renew_forever())

    async def stop(self) -> None:
        """Stop renewing; wait (at most a second) for the usage still being written."""
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)

    @staticmethod
    def applies(method: str, path: str) -> bool:
        """Whether limits apply to a request (an inference route; ``path/`` too)."""
        return method == "POST" and (path in INFERENCE_PATHS or path[:-1] in INFERENCE_PATHS)

    async def admit(self, who: Caller) -> Admission:
        """Let a request of ``who`` through (without a key: no limits; its usage counts
        under the tenant ""). Raises ``TooManyRequests`` past a limit (no lease is then
        held), ``RedisUnavailable``."""
        tenant, key = who.tenant, who.key
        admission = Admission(self, tenant, key, who.usage)
        if key is None or (
            key.max_concurrent is None and key.tokens_per_day is None and key.rpm is None
        ):
            return admission
        try:
            lease, admitted, failing, retry_ms = await self._evaluate(tenant, key)
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc
        if (refusal := self._refusal(key, admitted, failing, retry_ms)) is not None:
            raise refusal
        if lease:
            admission.lease = lease
            self._leases[lease] = lease_key(tenant)
        return admission

    async def _evaluate(self, tenant: str, key: ApiKey) -> tuple[str, int, int, int]:
        """Run the admission script for ``key``: the lease it may have taken ("" if none),
        ADMIT_SCRIPT's verdict, the rate's failing index and retry (ms). A script Redis lost
        (a restart) is loaded again."""
        assert self._redis is not None
        now = time.time()
        lease = f"{self._prefix}{next(self._ids)}" if key.max_concurrent is not None else ""
        args = self._script_args(tenant, key, lease, now)
        for attempt in (0, 1):
            sha = self._sha or await self._load()
            try:
                admitted, failing, retry_ms = await self._redis.evalsha(sha, 3, *args)
            except NoScriptError:
                self._sha = None
                if attempt:
                    raise
                continue
            break
        taken = lease if admitted == ADMITTED and int(failing) < 0 else ""
        return taken, int(admitted), int(failing), int(retry_ms)

    def _script_args(self, tenant: str, key: ApiKey, lease: str, now: float) -> list[Any]:
        """The admission script's keys and arguments (``protocol.admission_script``)."""
        most = -1 if key.max_concurrent is None else key.max_concurrent
        budget = -1 if key.tokens_per_day is None else key.tokens_per_day
        ttl = self._lease_ttl
        keys = [lease_key(tenant), budget_key(tenant, usage.today(now)), rate_key(tenant)]
        args = [now, lease, now + ttl, most, budget, math.ceil(2 * ttl)]
        if key.rpm is None:
            return [*keys, *args, 0]
        return [*keys, *args, 1, int(now * 1000), 1, *self._gcra_args(key.rpm)]

    def _gcra_args(self, rpm: int) -> list[Any]:
        """GCRA's arguments after now and weight: the state's TTL (ms), as pyrate-limiter's
        store computes it, the number of rates, and the algorithm's own."""
        args = self._rates.get(rpm)
        if args is None:
            rate = Rate(rpm, Duration.MINUTE)
            ttl = math.ceil(2 * rate.burst * rate.interval / rate.limit)
            args = self._rates[rpm] = [ttl, 1, *_GCRA.redis_args([rate])]
        return args

    @staticmethod
    def _refusal(key: ApiKey, verdict: int, failing: int, retry_ms: int) -> TooManyRequests | None:
        """The 429 for the first limit the script's answer says the request is past, or
        None: ADMIT_SCRIPT's ``verdict`` first, then the rate's (``failing`` >= 0)."""
        if verdict == OVER_BUDGET:
            now = time.time()
            midnight = (now // usage.DAY + 1) * usage.DAY
            return TooManyRequests(
                f"this API key has used its {key.tokens_per_day} tokens for today (UTC)",
                code="token_budget_exhausted",
                retry_after=max(1, math.ceil(midnight - now)),
            )
        if verdict == TOO_MANY:
            return TooManyRequests(
                f"this API key already has {key.max_concurrent} requests running or queued",
                code="concurrency_limited",
                retry_after=CONCURRENCY_RETRY,
            )
        if failing >= 0:
            return TooManyRequests(
                f"this API key is limited to {key.rpm} requests per minute",
                code="rate_limited",
                retry_after=max(1, math.ceil(retry_ms / 1000)),
            )
        return None

    async def _load(self) -> str:
        assert self._redis is not None
        self._sha = str(await self._redis.script_load(_SCRIPT))
        return self._sha

    def finish(self, admission: Admission) -> None:
        """Release ``admission``'s lease and record its usage, in the background."""
        if admission.lease:
            self._leases.pop(admission.lease, None)
        if not admission.lease and not admission.usage.models:
            return
        task = asyncio.create_task(self._write(admission))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, admission: Admission) -> None:
        assert self._redis is not None
        tenant, key, used = admission.tenant, admission.key, admission.usage
        day = usage.today()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if admission.lease:
                    pipe.zrem(lease_key(tenant), admission.lease)
                if key is not None and key.tokens_per_day is not None and used.tokens:
                    pipe.incrby(budget_key(tenant, day), used.tokens)
                    pipe.expire(budget_key(tenant, day), BUDGET_TTL)
                usage.record(pipe, tenant, used, day)
                await pipe.execute()
        except RedisError as exc:
            log.warning("could not record the usage of key %r: %r", tenant, exc)

    async def _renew_forever(self) -> None:
        """Every third of ``lease_ttl``, push back the expiry of this process's leases."""
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            if not self._leases:
                continue
            expiry = time.time() + self._lease_ttl
            by_key: dict[str, dict[str, float]] = {}
            for lease, zset in self._leases.items():
                by_key.setdefault(zset, {})[lease] = expiry
            assert self._redis is not None
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for zset, leases in by_key.items():
                        pipe.zadd(zset, leases, xx=True)  # type: ignore[arg-type]
                        pipe.expire(zset, math.ceil(2 * self._lease_ttl))
                    await pipe.execute()
            except RedisError as exc:
                log.warning("could not renew %d leases: %r", len(self._leases), exc)
