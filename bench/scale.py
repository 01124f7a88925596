"""Figures e–g and embed: many workers, many open streams, one big /api/embed.

e. N workers, each in front of a stand-in that serves one request at a time in 200 ms:
   throughput over the ideal N × 5 req/s.
f, g. 1,000 streams held open at once: the API's resident memory, and not one error.
embed. One /api/embed of 10,000 short texts over 1, 2 and 4 workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import orjson

from bench.fleet import Lab
from bench.harness import Profile, errors_of, measure, percentile
from bench.hold import hold_streams
from bench.load import Request
from bench.probe import rss_mb
from bench.report import Row, Target
from oshepherd.testing.fleet import Fleet

__all__ = ["embed", "held_streams", "scaling"]

SLOW, SERVICE_TIME = "slow:latest", 0.2
HOLD = "hold:latest"
EMBED, BATCH = "embedder:latest", 256


def scaling(lab: Lab, profile: Profile) -> list[Row]:
    """e. Workers are added to one fleet, 1 → 2 → 4 → 8; each N runs for a fixed time with
    three clients per worker, so the model's queue is never empty."""
    body = orjson.dumps({"model": SLOW, "prompt": "hello", "stream": False})
    rows: list[Row] = []
    with lab.fleet() as fleet:
        fleet.start_api()
        for n in profile.scaling:
            _add_hosts(fleet, SLOW, n, SERVICE_TIME)
            runs = measure(
                {"gateway": fleet.url},
                lambda base: Request(base + "/api/generate", body, False),
                3 * n,
                seconds=profile.scaling_seconds,
                warmup=n,
            )
            run = runs["gateway"][0]
            errors, notes = errors_of([run])
            ideal = n / SERVICE_TIME
            target = Target(">=", 0.95) if n == 8 else None
            rows.append(
                Row(
                    "e",
                    f"scaling N={n} (direct = ideal N×5)",
                    "req/s",
                    ideal,
                    run.rate(profile.warmup),
                    "ratio",
                    target,
                    errors,
                    notes,
                    workers=n,
                )
            )
    return rows


def _add_hosts(fleet: Fleet, model: str, n: int, latency: float) -> None:
    """Until the fleet has ``n``: stand-ins serving ``model`` one request at a time in
    ``latency`` seconds, each behind a worker with one slot."""
    while len(fleet.standin_processes) < n:
        fleet.worker(fleet.standin_process(model, latency=latency, max_parallel=1), concurrency=1)
    fleet.wait_for_models(model, workers=n)


def held_streams(lab: Lab, profile: Profile) -> list[Row]:
    """f and g. The API's memory idle and with ``streams`` streams open at once, and how many
    of those streams failed. Workers get just enough slots between them for every stream."""
    n = profile.streams
    with lab.fleet() as fleet:
        # Every stream is admitted at once, so the queue may briefly hold all of them.
        api = fleet.start_api(max_queue_depth=2 * n)
        host = fleet.standin_process(
            HOLD, tokens=profile.stream_tokens, token_delay=profile.stream_token_delay
        )
        for _ in range(profile.stream_workers):
            fleet.worker(host, concurrency=math.ceil(n / profile.stream_workers))
        fleet.wait_for_models(HOLD, workers=profile.stream_workers)
        idle = _idle_rss(fleet, api.process.pid)
        held = hold_streams(fleet.url, HOLD, n, profile.stream_tokens + 1, api.process.pid)
    errors, first = errors_of([held.run])
    ttft = f"TTFT p50 {held.ttft_p50 * 1e3:.0f} ms, p99 {held.ttft_p99 * 1e3:.0f} ms"
    rss: float | None = held.rss
    if held.peak >= n:
        notes = [f"all {n} open {held.open_after:.1f} s after the first was sent; {ttft}"]
    else:  # no reading at n: the row shows none, and fails
        notes = [f"at most {held.peak} of {n} open at once, RSS then {held.rss:.0f} MB; {ttft}"]
        rss = None
    return [
        Row("f", "API RSS idle", "MB", None, idle),
        Row(
            "f",
            f"API RSS, {n} open streams",
            "MB",
            None,
            rss,
            "value",
            Target("<=", 120.0, on="gateway"),
            notes=notes,
        ),
        Row(
            "g",
            f"streams open at once (of {n})",
            "streams",
            None,
            held.peak,
            "value",
            Target(">=", n, on="gateway"),
        ),
        Row(
            "g",
            f"failed streams (of {n})",
            "streams",
            None,
            errors,
            "value",
            Target("<=", 0, on="gateway"),
            notes=first,
        ),
    ]


def _idle_rss(fleet: Fleet, pid: int) -> float:
    """The API's RSS once warm but idle. The warm-up costs no tokens: an empty prompt only
    loads the model, and is answered at once."""
    load = orjson.dumps({"model": HOLD, "prompt": "", "stream": False})
    measure(
        {"gateway": fleet.url},
        lambda base: Request(base + "/api/generate", load, False),
        4,
        count=40,
        warmup=0,
    )
    time.sleep(0.5)  # let the warm-up's connections close before the reading
    return rss_mb(pid)


def embed(lab: Lab, profile: Profile) -> list[Row]:
    """One /api/embed of many short texts, with 1, 2, 4 workers; the API batches by 256.

    The stand-in's only cost knob is per request (``--latency`` behind ``--max-parallel 1``),
    not per input: the speed-up shows only if the API splits the input across workers."""
    texts = [f"short text number {i}" for i in range(profile.embed_texts)]
    body = orjson.dumps({"model": EMBED, "input": texts})

    def make(base: str) -> Request:
        return Request(base + "/api/embed", body, False, check=_embeddings(len(texts)))

    rows: list[Row] = []
    with lab.fleet() as fleet:
        fleet.start_api(embed_batch_size=BATCH)
        for n in profile.embed_workers:
            _add_hosts(fleet, EMBED, n, profile.embed_latency)
            runs = measure({"gateway": fleet.url}, make, 1, count=profile.embed_repeats, warmup=0)
            errors, notes = errors_of(runs["gateway"])
            took = percentile([s.latency for r in runs["gateway"] for s in r.ok], 50)
            base = rows[0].gateway if rows else took
            rows.append(
                Row(
                    "embed",
                    f"{len(texts):,} texts, N={n} (direct = N=1 time)",
                    "s",
                    base,
                    took,
                    "speedup",
                    errors=errors,
                    notes=notes,
                    workers=n,
                )
            )
        direct = measure({"direct": fleet.standin_processes[0].url}, make, 1, count=1, warmup=1)
    took_direct = direct["direct"][0].samples[0].latency
    batches = math.ceil(len(texts) / BATCH)
    rows[0].notes.append(
        f"{batches} batches of {BATCH} at {profile.embed_latency * 1e3:.0f} ms each: ideal "
        f"{batches * profile.embed_latency:.1f} s on 1 worker, ×N faster on N; the whole "
        f"input sent straight to one stand-in took {took_direct:.2f} s "
        "(its cost is per request, not per input)"
    )
    return rows


def _embeddings(count: int) -> Callable[[bytes], str]:
    """The check of an /api/embed answer: one embedding per input."""

    def check(body: bytes) -> str:
        try:
            got = len(orjson.loads(body)["embeddings"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return f"not an embed answer: {body[:120]!r}"
        return "" if got == count else f"{got} embeddings for {count} inputs"

    return check
