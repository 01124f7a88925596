"""What every figure shares: the sizes of a run (default or ``--quick``), and one
measurement of one load against each path (direct, gateway) with CPU accounting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import uvloop

from bench.load import Request, Run, client, closed_loop, request
from bench.probe import CpuMeter

__all__ = ["DEFAULT", "QUICK", "Profile", "cpu_note", "errors_of", "measure", "percentile"]


@dataclass(frozen=True)
class Profile:
    """How long each figure runs. Counts are per path; seconds are per path and per N."""

    latency_requests: int  # a and b at concurrency 1
    ttft64_requests: int  # a at concurrency 64
    rounds: int  # a and b alternate direct and gateway this often: noise hits both alike
    seconds: float  # c and d
    warmup: float  # seconds at the start of a timed run that rates leave out
    scaling: tuple[int, ...]  # e
    scaling_seconds: float
    streams: int  # f and g
    stream_workers: int
    stream_tokens: int
    stream_token_delay: float
    embed_texts: int
    embed_workers: tuple[int, ...]
    embed_latency: float  # the stand-ins' cost per /api/embed request
    embed_repeats: int
    soak_requests: int
    blob_mib: int  # the size of the blob figure's upload


DEFAULT = Profile(
    latency_requests=2000,
    ttft64_requests=64 * 40,
    rounds=4,
    seconds=8.0,
    warmup=1.0,
    scaling=(1, 2, 4, 8),
    scaling_seconds=8.0,
    streams=1000,
    stream_workers=4,
    stream_tokens=40,
    stream_token_delay=0.5,
    embed_texts=10_000,
    embed_workers=(1, 2, 4),
    embed_latency=0.1,
    embed_repeats=3,
    soak_requests=10_000,
    blob_mib=1024,
)
QUICK = Profile(
    latency_requests=200,
    ttft64_requests=64 * 4,
    rounds=2,
    seconds=1.5,
    warmup=0.3,
    scaling=(1, 2),
    scaling_seconds=2.0,
    streams=200,
    stream_workers=1,
    stream_tokens=8,
    stream_token_delay=0.5,
    embed_texts=2000,
    embed_workers=(1, 2),
    embed_latency=0.05,
    embed_repeats=1,
    soak_requests=1_000,
    blob_mib=128,
)


def measure(
    paths: dict[str, str],
    make: Callable[[str], Request],
    concurrency: int,
    *,
    count: int | None = None,
    seconds: float | None = None,
    rounds: int = 1,
    warmup: int | None = None,
    cpu: dict[str, list[int]] | None = None,
) -> dict[str, list[Run]]:
    """Run the same closed-loop load on each base URL of ``paths`` (``make(base)`` builds the
    request), ``rounds`` times in turn, after ``warmup`` requests (default: two per client)
    that open the connections; ``count`` is split over the rounds."""
    per_round = None if count is None else max(1, count // rounds)
    warm = max(20, 2 * concurrency) if warmup is None else warmup

    async def run_all() -> dict[str, list[Run]]:
        meter = CpuMeter(cpu or {})
        out: dict[str, list[Run]] = {name: [] for name in paths}
        async with client() as session:
            requests = {name: make(base) for name, base in paths.items()}
            for req in requests.values():
                if warm:
                    await closed_loop(partial(request, session, req), concurrency, count=warm)
            for _ in range(rounds):
                for name, req in requests.items():
                    meter.start()
                    run = await closed_loop(
                        partial(request, session, req),
                        concurrency,
                        count=per_round,
                        seconds=seconds,
                    )
                    run.cpu = meter.since_start()
                    out[name].append(run)
        return out

    return uvloop.run(run_all())


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, interpolated between the closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def errors_of(runs: list[Run]) -> tuple[int, list[str]]:
    """How many requests failed, and a note with the first failure, if any."""
    errors = [e for run in runs for e in run.errors]
    return len(errors), [f"first error: {errors[0]}"] if errors else []


def cpu_note(path: str, run: Run, units: float, unit: str, scale: float = 1e3) -> str:
    """CPU each role spent per ``unit`` (request, line) during ``run``, and the client's share
    of a core: near 100 % would mean the load generator, not the system, set the pace."""
    roles = {"client": run.client_cpu, **run.cpu}
    floor = 0.01 * sum(roles.values())  # idle processes' background work is not the load's
    parts = [f"{role} {cpu * scale / units:.3g}" for role, cpu in roles.items() if cpu > floor]
    per = "ms" if scale == 1e3 else "µs"
    return (
        f"{path}: CPU {per}/{unit}: "
        + ", ".join(parts)
        + f"; the client used {run.client_load:.0%} of one core"
    )
