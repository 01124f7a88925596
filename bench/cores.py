"""Figure cores: tiny requests per second with the API as 1 and as 2 processes
(``API_PROCESSES``, ``start-api --workers``) on one port.

One fleet: a stand-in process that answers at once (5 tokens) and a worker with 64 slots in
front of it, as figure c. The API is started anew for each run, N = 1 and N = 2 in turn
(``profile.rounds`` pairs: noise on a shared machine hits both alike), loaded with
non-streaming /api/generate at concurrency 32; the rows are the medians of the pairs.
"""

from __future__ import annotations

import statistics

import redis

from bench.fleet import Lab
from bench.harness import Profile, errors_of, measure
from bench.latency import SLOTS, TINY, TINY_TOKENS, generate_request
from bench.load import Run
from bench.report import Row
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet

__all__ = ["api_processes"]

CONCURRENCY = 32
COUNTS = (1, 2)


def api_processes(lab: Lab, profile: Profile) -> list[Row]:
    """Rows: req/s for N = 1 and N = 2 (their ratio), and the API's CPU per request."""
    runs: dict[int, list[Run]] = {n: [] for n in COUNTS}
    with lab.fleet() as fleet:
        host = fleet.standin_process(TINY, tokens=TINY_TOKENS)
        fleet.worker(host, concurrency=SLOTS)
        for _ in range(max(profile.rounds, 3)):
            for n in COUNTS:
                runs[n].append(_run(fleet, n, profile))
    rates = {n: statistics.median(r.rate(profile.warmup) for r in runs[n]) for n in COUNTS}
    cpu = {n: statistics.median(_api_cpu_ms(r) for r in runs[n]) for n in COUNTS}
    errors, notes = errors_of([r for n in COUNTS for r in runs[n]])
    each = "; ".join(
        f"N={n}: " + ", ".join(f"{r.rate(profile.warmup):.0f}" for r in runs[n]) for n in COUNTS
    )
    label = f"tiny requests/s c={CONCURRENCY}, API processes 1 (direct col.) vs 2 (gateway col.)"
    return [
        Row("cores", label, "req/s", rates[1], rates[2], "ratio", None, errors,
            [*notes, f"runs in turn: {each}"]),
        Row("cores", "API CPU per tiny request, N=1 vs N=2 (all processes)", "ms",
            cpu[1], cpu[2], "ratio"),
    ]  # fmt: skip


def _run(fleet: Fleet, n: int, profile: Profile) -> Run:
    """One timed run against a fresh API of ``n`` processes, every one of them subscribed."""
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        before = int(client.execute_command("PUBSUB", "NUMPAT"))
        api = fleet.start_api(api_processes=n)
        wait_until(
            lambda: int(client.execute_command("PUBSUB", "NUMPAT")) >= before + n,
            30,
            f"{n} API processes subscribed",
        )
    fleet.wait_for_models(TINY)
    try:
        make = generate_request(TINY, TINY_TOKENS, False)
        pids = fleet.pids()
        out = measure(
            {f"N={n}": fleet.url},
            make,
            CONCURRENCY,
            seconds=profile.seconds,
            cpu={"api": pids["api"]},
        )
        return out[f"N={n}"][0]
    finally:
        api.stop()
        fleet.stack.components.remove(api)


def _api_cpu_ms(run: Run) -> float:
    return run.cpu.get("api", 0.0) * 1e3 / max(len(run.ok), 1)
