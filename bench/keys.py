"""Figure keys: what API keys and every per-key limit add to the time to first token.

Two fleets side by side, each an API and a 64-slot worker in front of a stand-in that
answers at once (5 tokens): one without keys (direct column), one where a key exists and
the requests carry one with all three limits set, none of them reached (gateway column):
a concurrency lease and the day's token budget (one Lua round trip), the rate (pyrate-
limiter's GCRA, one more), and the lease's release plus the usage written after the
response. Both record usage. Streamed /api/generate at concurrency 1, the two fleets in
turn for ``rounds`` rounds.
"""

from __future__ import annotations

import dataclasses

import httpx
import redis

from bench.fleet import Lab
from bench.harness import Profile, measure
from bench.latency import TINY, TINY_TOKENS, generate_request, percentile_rows
from bench.load import Request
from bench.report import Row, Target
from oshepherd.keys import KeyStore
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet

__all__ = ["keys_overhead"]

LIMITS = {"max_concurrent": 1000, "rpm": 10_000_000, "tokens_per_day": 10**15}


def keys_overhead(lab: Lab, profile: Profile) -> list[Row]:
    """keys: TTFT p50 and p99 with keys and all limits on, against no keys."""
    with lab.fleet() as open_fleet, lab.fleet() as keyed:
        for fleet in (open_fleet, keyed):
            _serve(fleet)
        secret = _key(keyed)
        headers = {keyed.url: {"Authorization": f"Bearer {secret}"}}

        tiny = generate_request(TINY, TINY_TOKENS, True)

        def make(base: str) -> Request:
            return dataclasses.replace(tiny(base), headers=headers.get(base, {}))

        runs = measure(
            {"direct": open_fleet.url, "gateway": keyed.url},
            make,
            1,
            count=profile.latency_requests,
            rounds=profile.rounds,
        )
    rows = percentile_rows("keys", "TTFT c=1", runs, "ttft", {50: Target("<=", 0.2)})
    rows[0].notes.append(
        "direct = no keys; gateway = a key with max_concurrent, rpm and tokens_per_day "
        "set (none reached); added = the difference of the percentiles"
    )
    return rows


def _serve(fleet: Fleet) -> None:
    host = fleet.standin_process(TINY, tokens=TINY_TOKENS)
    fleet.start_api()
    fleet.worker(host, concurrency=64)
    fleet.wait_for_models(TINY)


def _key(fleet: Fleet) -> str:
    """A user key with every limit, once the API requires it."""
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        secret, _ = KeyStore(client).create({"name": "bench", **LIMITS})
    wait_until(lambda: _refuses_anonymous(fleet.url + "/api/tags"), 10, "keys on")
    return secret


def _refuses_anonymous(url: str) -> bool:
    return httpx.get(url).status_code == 401
