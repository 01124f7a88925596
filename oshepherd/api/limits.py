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

A request is admitted when it queues its first job, by the script that queues it
(``protocol.admitted_enqueue_script``: ``ADMIT_SCRIPT`` checks the budget and the
concurrency limit and takes the lease, the rate limiter's own script counts the request,
and only then is the job pushed), so limits cost no round trip of their own. The rate
counts attempts: a request refused for its budget or concurrency spends a unit of it too;
one refused for its rate gives its lease back in the same script. A request that queues no
job (a 400, a 404) is not counted. Past a limit the request gets ``TooManyRequests`` (429,
``Retry-After``) with its ``code``, before any job of it exists: ``token_budget_exhausted``
(retry at the next UTC midnight), ``concurrency_limited`` (1 s) or ``rate_limited`` (when
GCRA allows the next).

Limits apply to the inference routes (``INFERENCE_PATHS``). ``Admission.close`` releases the
lease and writes the request's usage (``oshepherd.usage``) after the response, off its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyrate_limiter import GCRA, Duration, Rate
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from oshepherd import usage
from oshepherd.api.autopipeline import AutoPipeline
from oshepherd.api.errors import TooManyRequests
from oshepherd.keys import ApiKey
from oshepherd.protocol import (
    BUDGET_TTL,
    admitted_enqueue_script,
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
WRITE_EVERY = 0.05  # seconds: under load, usage is written at most this often
_GCRA = GCRA()
_SCRIPT = admitted_enqueue_script(_GCRA.redis_script() or "")


@dataclass(slots=True)
class Admission:
    """A request to an inference route, admitted with its first job (``enqueue``): ``close``
    it when the request ends (it releases the lease and records the usage, in the
    background). ``pending`` until the limits have been checked (never, for a request that
    queues no job, or whose key has no limits); ``refusal``, the 429 they gave."""

    limiter: Limiter
    tenant: str
    key: ApiKey | None
    usage: usage.Usage
    pending: bool = False
    refusal: TooManyRequests | None = None
    lease: str = ""
    closed: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def enqueue(self, queue: str, message: bytes, max_depth: int) -> int | None:
        """Push ``message`` on the list ``queue`` with the admission, if it is still
        pending: the list's new depth (-1: full, nothing taken), or None once the admission
        is decided (the caller pushes as usual). Raises ``TooManyRequests`` past a limit
        (for every job of a refused request), ``RedisError``."""
        async with self._lock:  # a scatter's jobs: the first is admitted, the rest wait
            if self.refusal is not None:
                raise self.refusal
            if not self.pending:
                return None
            return await self.limiter.enqueue(self, queue, message, max_depth)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.limiter.finish(self)


class Limiter:
    """One API process's side of the limits; ``start`` it with the process's Redis."""

    def __init__(self, *, lease_ttl: float) -> None:
        self._lease_ttl = lease_ttl
        self._redis: Redis | None = None
        self._pipeline: AutoPipeline | None = None  # the admissions of a loop turn, together
        self._leases: dict[str, str] = {}  # live lease id -> its zset
        self._ids = itertools.count()
        self._prefix = new_id()[:12] + ":"
        self._sha: str | None = None  # _SCRIPT's, once loaded
        self._rates: dict[int, list[Any]] = {}  # rpm -> GCRA's arguments after the header
        self._finished: list[Admission] = []  # requests whose lease and usage await writing
        self._writer: asyncio.Task[None] | None = None  # writing them
        self._lease_ended = asyncio.Event()  # since the last write began
        self._renewing: asyncio.Task[None] | None = None

    def start(self, redis: Redis) -> None:
        self._redis = redis
        self._pipeline = AutoPipeline(redis)
        self._renewing = asyncio.create_task(self._renew_forever())

    async def stop(self) -> None:
        """Stop renewing; wait (at most a second) for the usage still being written."""
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=1.0)

    @staticmethod
    def applies(method: str, path: str) -> bool:
        """Whether limits apply to a request (an inference route; ``path/`` too)."""
        return method == "POST" and (path in INFERENCE_PATHS or path[:-1] in INFERENCE_PATHS)

    def admission(self, who: Caller) -> Admission:
        """The admission of a request of ``who`` (without a key, or a key without limits:
        nothing to check; its usage counts all the same, under the tenant "" without a
        key). Its limits are checked when it queues its first job (``Admission.enqueue``)."""
        key = who.key
        limited = key is not None and (
            key.max_concurrent is not None or key.tokens_per_day is not None or key.rpm is not None
        )
        return Admission(self, who.tenant, key, who.usage, pending=limited)

    async def enqueue(self, admission: Admission, queue: str, message: bytes, depth: int) -> int:
        """Check ``admission``'s limits and push ``message`` on ``queue`` if they let it
        through (``protocol.admitted_enqueue_script``, one EVALSHA, in one pipeline with
        the loop turn's other admissions; loaded again if Redis lost it): the list's new
        depth, -1 when full (the admission stays pending). Raises ``TooManyRequests``,
        ``RedisError``."""
        assert self._pipeline is not None and admission.key is not None
        key, tenant = admission.key, admission.tenant
        now = time.time()
        lease = f"{self._prefix}{next(self._ids)}" if key.max_concurrent is not None else ""
        keys, args = self._script_args(tenant, key, lease, now)
        for attempt in (0, 1):
            sha = self._sha or await self._load()
            try:
                verdict, failing, retry_ms, pushed = await self._pipeline.execute(
                    "EVALSHA", sha, 4, *keys, queue, message, depth, *args
                )
            except NoScriptError:
                self._sha = None
                if attempt:
                    raise
                continue
            break
        if pushed == -1:
            return -1
        admission.pending = False
        refusal = self._refusal(key, int(verdict), int(failing), int(retry_ms))
        if refusal is not None:
            admission.refusal = refusal
            raise refusal
        if lease:
            admission.lease = lease
            self._leases[lease] = lease_key(tenant)
        return int(pushed)

    def _script_args(
        self, tenant: str, key: ApiKey, lease: str, now: float
    ) -> tuple[list[Any], list[Any]]:
        """The admission's keys (before the job's list) and arguments (after the message
        and the depth), as ``protocol.admitted_enqueue_script`` takes them."""
        most = -1 if key.max_concurrent is None else key.max_concurrent
        budget = -1 if key.tokens_per_day is None else key.tokens_per_day
        ttl = self._lease_ttl
        keys = [lease_key(tenant), budget_key(tenant, usage.today(now)), rate_key(tenant)]
        args = [now, lease, now + ttl, most, budget, math.ceil(2 * ttl)]
        if key.rpm is None:
            return keys, [*args, 0]
        return keys, [*args, 1, int(now * 1000), 1, *self._gcra_args(key.rpm)]

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
                retry=False,
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
        self._finished.append(admission)
        if admission.lease:
            self._lease_ended.set()  # a lease is not held back by WRITE_EVERY
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())

    async def _write_all(self) -> None:
        """Write what finished requests leave (leases to release, usage to record) until
        none is left, one pipeline at a time and, but for a lease to release, at most one
        every ``WRITE_EVERY`` seconds: the requests that finish meanwhile go together into
        the next, so a busy API makes one round trip for many requests, and an idle one
        writes at once."""
        try:
            while self._finished:
                batch, self._finished = self._finished, []
                self._lease_ended.clear()
                paced = asyncio.get_running_loop().time() + WRITE_EVERY
                await self._write(batch)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(paced):
                        await self._lease_ended.wait()
        finally:
            self._writer = None

    async def _write(self, batch: list[Admission]) -> None:
        assert self._redis is not None
        day = usage.today()
        budgets: Counter[str] = Counter()  # tenant -> tokens to count against its budget
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for admission in batch:
                    if admission.lease:
                        pipe.zrem(lease_key(admission.tenant), admission.lease)
                    key, tokens = admission.key, admission.usage.tokens
                    if key is not None and key.tokens_per_day is not None and tokens:
                        budgets[admission.tenant] += tokens
                for tenant, tokens in budgets.items():
                    pipe.incrby(budget_key(tenant, day), tokens)
                    pipe.expire(budget_key(tenant, day), BUDGET_TTL)
                usage.record(pipe, ((a.tenant, a.usage) for a in batch), day)
                await pipe.execute()
        except RedisError as exc:
            tenants = sorted({a.tenant for a in batch})
            log.warning("could not record the usage of keys %r: %r", tenants, exc)

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
