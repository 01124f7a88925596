"""Usage per API key, model and UTC day: requests, prompt tokens and completion tokens.

The API counts each request once per model it ran a job for, and adds the tokens its jobs'
final frames carry (``End`` or a last ``Head``: what the worker read from Ollama's answer,
``oshepherd.tokens``). It writes them after the response (``record``), into one Redis hash
per day (``protocol.usage_key``), kept ``USAGE_TTL``. A request without a key counts under
the tenant "", shown as "(no key)". ``oshepherd usage`` and ``GET /oshepherd/v1/usage`` read
them back (``read``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from oshepherd.protocol import (
    THROUGHPUT_BUCKET,
    THROUGHPUT_TTL,
    USAGE_TTL,
    throughput_key,
    usage_key,
)

__all__ = ["NO_KEY", "Row", "Usage", "days", "read", "record", "today"]

NO_KEY = "(no key)"  # how the tenant "" (requests without a key) is shown
METRICS = ("requests", "prompt", "completion")
DAY = 86400
MAX_DAYS = 400  # as long as usage is kept (protocol.USAGE_TTL)


def today(now: float | None = None) -> str:
    """The UTC day of ``now`` (epoch s; default: now), "YYYY-MM-DD"."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))


def days(count: int, now: float | None = None) -> list[str]:
    """The last ``count`` UTC days up to today, oldest first."""
    end = time.time() if now is None else now
    return [today(end - back * DAY) for back in reversed(range(count))]


@dataclass(slots=True)
class Usage:
    """What the jobs of one request used, per model (normalized): [prompt, completion]
    tokens. ``JobStream`` adds to it; the request counts once for each model in it."""

    models: dict[str, list[int]] = field(default_factory=dict)

    def job(self, model: str) -> None:
        """A job for ``model`` was queued."""
        self.models.setdefault(model, [0, 0])

    def add(self, model: str, prompt: int, completion: int) -> None:
        """A job for ``model`` ended with these tokens."""
        counts = self.models.setdefault(model, [0, 0])
        counts[0] += prompt
        counts[1] += completion

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens, over every model."""
        return sum(p + c for p, c in self.models.values())


def record(pipe: Pipeline, used: Iterable[tuple[str, Usage]], day: str) -> None:
    """Queue on ``pipe`` the writes that add each ``(tenant, usage)`` of ``used`` (one per
    request) to the tenant's ``day``, and to the fleet's throughput bucket of now
    (``protocol.throughput_key``): one HINCRBY per field, however many requests."""
    key = usage_key(day)
    rate = throughput_key(int(time.time()) // THROUGHPUT_BUCKET)
    totals: Counter[tuple[str, str]] = Counter()  # (hash, field) -> amount
    for tenant, usage in used:
        for model, (prompt, completion) in usage.models.items():
            for hash_key, prefix in ((key, f"{tenant}|{model}|"), (rate, f"{model}|")):
                totals[hash_key, prefix + "requests"] += 1
                if prompt:
                    totals[hash_key, prefix + "prompt"] += prompt
                if completion:
                    totals[hash_key, prefix + "completion"] += completion
    if not totals:
        return
    for (hash_key, name), amount in totals.items():
        pipe.hincrby(hash_key, name, amount)
    pipe.expire(key, USAGE_TTL)
    pipe.expire(rate, THROUGHPUT_TTL)


@dataclass(frozen=True, slots=True)
class Row:
    """One key's use of one model on one day; ``key`` is the key id, "" for no key."""

    day: str
    key: str
    model: str
    requests: int = 0
    prompt: int = 0
    completion: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "key": self.key,
            "model": self.model,
            "requests": self.requests,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
        }


async def read(redis: Redis, when: list[str], key: str | None = None) -> list[Row]:
    """Usage on the days ``when``, of the key id ``key`` ("": no key) or of all keys, sorted
    by day, key and model. Raises ``RedisError``."""
    async with redis.pipeline(transaction=False) as pipe:
        for day in when:
            pipe.hgetall(usage_key(day))
        hashes = await pipe.execute()
    rows: list[Row] = []
    for day, raw in zip(when, hashes, strict=True):
        cells: dict[tuple[str, str], dict[str, int]] = {}
        for name, value in raw.items():
            tenant, _, rest = _text(name).partition("|")
            model, _, metric = rest.rpartition("|")
            if metric in METRICS and (key is None or tenant == key):
                cells.setdefault((tenant, model), {})[metric] = int(value)
        rows += [Row(day, t, m, **counts) for (t, m), counts in sorted(cells.items())]
    return rows


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
