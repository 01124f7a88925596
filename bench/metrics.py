"""Figures metrics and scrape: what Prometheus metrics cost a request, and what a scrape costs.

metrics: two fleets side by side, each an API and a 64-slot worker in front of a stand-in
that answers at once (5 tokens): one with ``METRICS=false`` (direct column), one with the
per-request metrics on (gateway column). Streamed /api/generate at concurrency 1, the two
fleets in turn for ``rounds`` rounds; the target: added TTFT p50 within 0.1 ms.

scrape: an API whose registry holds ``WORKERS`` workers (fake registry entries written
straight to Redis, each holding ``MODELS_EACH`` of ``MODELS`` models, one loaded, with a
stats hash of tokens), scraped ``SCRAPES`` times in a row on one connection: the time of a
``/metrics`` and of a ``/metrics/fleet`` answer, p50 and p99; the target: under 50 ms.
"""

from __future__ import annotations

import time

import httpx
import redis

from bench.fleet import Lab
from bench.harness import Profile, measure, percentile
from bench.latency import TINY, TINY_TOKENS, generate_request, percentile_rows
from bench.report import Row, Target
from oshepherd.protocol import WORKERS_INDEX, WorkerEntry, worker_key, worker_stats_key
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet

__all__ = ["metrics_overhead", "scrape"]

WORKERS = 100
MODELS = 20
MODELS_EACH = 4
SCRAPES = 200
LIFETIME = 3600.0  # seconds the fake entries live


def metrics_overhead(lab: Lab, profile: Profile) -> list[Row]:
    """metrics: TTFT p50 and p99 with the per-request metrics on, against off."""
    with lab.fleet() as off, lab.fleet() as on:
        for fleet, enabled in ((off, False), (on, True)):
            host = fleet.standin_process(TINY, tokens=TINY_TOKENS)
            fleet.start_api(metrics=enabled)
            fleet.worker(host, concurrency=64)
            fleet.wait_for_models(TINY)
        runs = measure(
            {"direct": off.url, "gateway": on.url},
            generate_request(TINY, TINY_TOKENS, True),
            1,
            count=profile.latency_requests,
            rounds=profile.rounds,
        )
    rows = percentile_rows("metrics", "TTFT c=1", runs, "ttft", {50: Target("<=", 0.1)})
    rows[0].notes.append(
        "direct = METRICS=false; gateway = metrics on; added = the difference of the percentiles"
    )
    return rows


def scrape(lab: Lab, profile: Profile) -> list[Row]:
    """scrape: /metrics and /metrics/fleet answer times with ``WORKERS`` workers."""
    with lab.fleet() as fleet:
        fleet.start_api()
        _register_fakes(fleet)
        rows = []
        with httpx.Client(base_url=fleet.url, timeout=10) as client:
            wait_until(lambda: _workers_seen(client) == WORKERS, 10, f"{WORKERS} workers")
            for path in ("/metrics", "/metrics/fleet"):
                times = _scrape_times(client, path)
                for q in (50, 99):
                    target = Target("<=", 50, on="gateway") if q == 50 else None
                    label, value = f"{path} p{q}", percentile(times, q)
                    rows.append(Row("scrape", label, "ms", None, value, "value", target))
        rows[0].notes.append(
            f"{WORKERS} registered workers, {MODELS} models ({MODELS_EACH} per worker, 1 "
            f"loaded), {SCRAPES} scrapes in a row on one connection"
        )
    return rows


def _register_fakes(fleet: Fleet) -> None:
    """``WORKERS`` registry entries and their stats hashes, as live workers write them."""
    now = time.time()
    with redis.Redis.from_url(fleet.stack.redis_url) as client, client.pipeline() as pipe:
        for i in range(WORKERS):
            held = [f"model{(i + k) % MODELS}:latest" for k in range(MODELS_EACH)]
            entry = WorkerEntry(
                id=f"fake-{i}", hostname=f"gpu{i}", ollama_url=f"http://gpu{i}:11434",
                version="0.12.0", healthy=True, error="",
                models=[{"name": m, "model": m} for m in held],
                running=[{"name": held[0], "model": held[0]}], slots=4, in_flight=i % 5,
                started_at=now, expires=now + LIFETIME,
            )  # fmt: skip
            pipe.set(worker_key(entry.id), entry.to_json(), ex=int(LIFETIME))
            pipe.zadd(WORKERS_INDEX, {entry.id: entry.expires})
            stats = {f"{m}|{kind}": 1000 + i for m in held for kind in ("prompt", "completion")}
            pipe.hset(worker_stats_key(entry.id), mapping={**stats, f"{held[0]}|tps": 42.5})
        pipe.execute()


def _workers_seen(client: httpx.Client) -> int:
    response = client.get("/metrics/fleet")
    if response.status_code != 200:
        return 0
    for line in response.text.splitlines():
        if line.startswith('oshepherd_workers{state="healthy"}'):
            return int(float(line.split()[-1]))
    return 0


def _scrape_times(client: httpx.Client, path: str) -> list[float]:
    """``SCRAPES`` answer times of ``path``, in milliseconds."""
    times = []
    for _ in range(SCRAPES):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1e3)
        response.raise_for_status()
    return times
