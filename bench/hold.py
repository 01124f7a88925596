"""Figures f and g's load: ``n`` streams opened at once and held open together.

Each stream counts as open from its first line to its end; the API's resident memory is
read while all of them are open. Streams last ``tokens × token_delay`` seconds at the
stand-in, long enough for the last one to open before the first one ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop

from bench.harness import percentile
from bench.load import Request, Run, Sample, client, request
from bench.probe import rss_mb

__all__ = ["Held", "hold_streams"]

OPEN_TIMEOUT = 90.0
RSS_READINGS, RSS_EVERY = 5, 0.2


@dataclass
class Held:
    run: Run
    peak: int  # most streams open at the same time
    rss: float  # the API's largest RSS (MB) read while the most streams were open
    open_after: float  # seconds from the first request to all streams open (or the timeout)

    @property
    def ttft_p50(self) -> float:
        return percentile([s.ttft for s in self.run.ok], 50)

    @property
    def ttft_p99(self) -> float:
        return percentile([s.ttft for s in self.run.ok], 99)


class _Gauge:
    """Streams open now, the most ever, and an event once ``target`` were open at once."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.now = self.peak = 0
        self.full = asyncio.Event()

    def up(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        if self.now >= self.target:
            self.full.set()

    def down(self) -> None:
        self.now -= 1


def hold_streams(url: str, model: str, n: int, lines: int, api_pid: int) -> Held:
    """Open ``n`` streamed /api/generate of ``lines`` lines each at once through ``url``."""
    return uvloop.run(_hold(url, model, n, lines, api_pid))


async def _hold(url: str, model: str, n: int, lines: int, api_pid: int) -> Held:
    gauge = _Gauge(n)
    body = orjson.dumps({"model": model, "prompt": "hello"})
    req = Request(url + "/api/generate", body, True, lines, on_first=gauge.up)
    cpu0, started = time.process_time(), time.perf_counter()
    async with client() as session:

        async def one() -> Sample:
            sample = await request(session, req)
            if sample.lines:
                gauge.down()
            return sample

        everything = asyncio.gather(*(one() for _ in range(n)))
        full = asyncio.create_task(gauge.full.wait())
        waiting: set[asyncio.Future[Any]] = {full, everything}
        # Ends when all are open, or when none will be any more (all ended, or too late).
        await asyncio.wait(waiting, timeout=OPEN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        full.cancel()
        open_after = time.perf_counter() - started
        rss = 0.0
        for _ in range(RSS_READINGS):
            rss = max(rss, rss_mb(api_pid))
            await asyncio.sleep(RSS_EVERY)
        samples = list(await everything)
    finished = time.perf_counter()
    run = Run(samples, started, finished, finished, time.process_time() - cpu0)
    return Held(run, gauge.peak, rss, open_after)
