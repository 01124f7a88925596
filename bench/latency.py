"""Figures a–d: what the gateway adds to one request, and what it keeps of the throughput.

One fleet serves them all: an API, and a worker with 64 slots in front of each of two
stand-ins that answer at once (``tiny``: 5 tokens; ``long``: 200 tokens). Each load runs
against the stand-in (direct) and against the API (gateway) with the same client code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import orjson

from bench.fleet import Lab
from bench.harness import Profile, cpu_note, errors_of, measure, percentile
from bench.load import Request, Run, Sample
from bench.report import Row, Target
from oshepherd.testing.fleet import Fleet

__all__ = ["FIGURES", "generate_request", "percentile_rows", "run"]

FIGURES = ("a", "b", "c", "d")
TINY, TINY_TOKENS = "tiny:latest", 5
LONG, LONG_TOKENS = "long:latest", 200
SLOTS = 64


def generate_request(model: str, tokens: int, stream: bool) -> Callable[[str], Request]:
    """A /api/generate for ``model`` at a base URL; a stream has one line per token + done."""
    body = orjson.dumps({"model": model, "prompt": "why is the sky blue?", "stream": stream})
    lines = tokens + 1 if stream else None
    return lambda base: Request(base + "/api/generate", body, stream, lines)


def run(lab: Lab, profile: Profile, wanted: set[str]) -> list[Row]:
    """The figures of ``wanted`` among a–d, on one fleet."""
    with lab.fleet() as fleet:
        fleet.start_api()
        hosts = {}
        for model, tokens, needed in (
            (TINY, TINY_TOKENS, {"a", "b", "c"}),
            (LONG, LONG_TOKENS, {"d"}),
        ):
            if wanted & needed:
                hosts[model] = fleet.standin_process(model, tokens=tokens)
                fleet.worker(hosts[model], concurrency=SLOTS)
                fleet.wait_for_models(model, workers=1)
        rows: list[Row] = []
        if "a" in wanted:
            rows += _ttft(fleet, hosts[TINY].url, profile)
        if "b" in wanted:
            rows += _latency(fleet, hosts[TINY].url, profile)
        if "c" in wanted:
            rows += _requests_per_second(fleet, hosts[TINY].url, profile)
        if "d" in wanted:
            rows += _lines_per_second(fleet, hosts[LONG].url, profile)
        return rows


def _paths(fleet: Fleet, direct: str) -> dict[str, str]:
    return {"direct": direct, "gateway": fleet.url}


def percentile_rows(
    figure: str, what: str, runs: dict[str, list[Run]], attr: str, targets: dict[int, Target]
) -> list[Row]:
    values = {p: [getattr(s, attr) * 1e3 for r in rs for s in r.ok] for p, rs in runs.items()}
    errors, notes = errors_of(runs["direct"] + runs["gateway"])
    return [
        Row(
            figure,
            f"{what} p{q}",
            "ms",
            percentile(values["direct"], q),
            percentile(values["gateway"], q),
            "added",
            targets.get(q),
            errors,
            list(notes),
        )
        for q in (50, 99)
    ]


def _ttft(fleet: Fleet, direct: str, profile: Profile) -> list[Row]:
    """a. Time to the first NDJSON line of a streamed /api/generate, at concurrency 1 and 64."""
    rows: list[Row] = []
    for concurrency, count in ((1, profile.latency_requests), (64, profile.ttft64_requests)):
        runs = measure(
            _paths(fleet, direct),
            generate_request(TINY, TINY_TOKENS, True),
            concurrency,
            count=count,
            rounds=profile.rounds,
        )
        targets = {50: Target("<=", 1.5), 99: Target("<=", 10.0)} if concurrency == 1 else {}
        rows += percentile_rows("a", f"TTFT c={concurrency}", runs, "ttft", targets)
    rows[0].notes.append("added = gateway percentile − direct percentile (unpaired samples)")
    return rows


def _latency(fleet: Fleet, direct: str, profile: Profile) -> list[Row]:
    """b. Latency of a non-streaming /api/generate, at concurrency 1."""
    runs = measure(
        _paths(fleet, direct),
        generate_request(TINY, TINY_TOKENS, False),
        1,
        count=profile.latency_requests,
        rounds=profile.rounds,
    )
    return percentile_rows("b", "non-streaming c=1", runs, "latency", {50: Target("<=", 2.0)})


def _requests_per_second(fleet: Fleet, direct: str, profile: Profile) -> list[Row]:
    """c. Tiny non-streaming requests per second at concurrency 32."""
    make = generate_request(TINY, TINY_TOKENS, False)
    runs = measure(_paths(fleet, direct), make, 32, seconds=profile.seconds, cpu=fleet.pids())
    rate = _rate_row("c", "tiny requests/s c=32", "req/s", runs, profile, "request")
    return [rate, *_cpu_rows(runs["gateway"][0])]


# The process roles of a gateway run, as they are named in the report.
ROLES = {"api": "API", "worker": "worker", "redis": "Redis"}
API_CPU_TARGET = 0.6  # ms of the API's CPU per tiny request (issue 12)


def _cpu_rows(run: Run) -> list[Row]:
    """c. CPU milliseconds each gateway process (the API, the worker, Redis) spent per good
    request of ``run``: process CPU time (user + system, psutil) over the run's duration,
    warm-up included, divided by the requests it answered."""
    requests = max(len(run.ok), 1)
    return [
        Row(
            "c",
            f"CPU per tiny request c=32: {label}",
            "ms",
            None,
            run.cpu.get(role, 0.0) * 1e3 / requests,
            target=Target("<=", API_CPU_TARGET, "gateway") if role == "api" else None,
        )
        for role, label in ROLES.items()
    ]


def _lines_per_second(fleet: Fleet, direct: str, profile: Profile) -> list[Row]:
    """d. Streamed NDJSON lines per second, 16 concurrent 200-token streams, one API."""
    make = generate_request(LONG, LONG_TOKENS, True)
    runs = measure(_paths(fleet, direct), make, 16, seconds=profile.seconds, cpu=fleet.pids())
    label = f"lines/s, 16 streams × {LONG_TOKENS} tokens"
    return [_rate_row("d", label, "lines/s", runs, profile, "line")]


def _rate_row(figure: str, label: str, unit: str, runs: dict[str, list[Run]], profile: Profile,
              per: Literal["request", "line"]) -> Row:  # fmt: skip
    """Requests or lines per second on each path, their ratio (target ≥ 0.5), and what each
    process spent per request or line."""
    count: Callable[[Sample], float] = (lambda s: 1.0) if per == "request" else (lambda s: s.lines)
    d, g = runs["direct"][0], runs["gateway"][0]
    errors, notes = errors_of([d, g])
    scale = 1e3 if per == "request" else 1e6
    for path, run in (("direct", d), ("gateway", g)):
        units = max(sum(count(s) for s in run.ok), 1.0)
        notes.append(cpu_note(path, run, units, per, scale))
    rates = [run.rate(profile.warmup, count) for run in (d, g)]
    return Row(figure, label, unit, rates[0], rates[1], "ratio", Target(">=", 0.5), errors, notes)
