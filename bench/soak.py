"""Soak: many requests at high concurrency while clients hang up at random and a worker is
killed (SIGKILL) and replaced mid-run. Counts what users would notice.

Every request is classified: ``completed`` (the whole answer, tokens in order), ``errored``
(an HTTP error or a final ``{"error": ...}`` line: the gateway said so), ``hung`` (no end
within the client's timeout), ``duplicated`` (a token repeated or out of order: must never
happen), ``malformed`` (anything else), or ``hung up`` (the client left on purpose). Once the
run is over and the gateway idle: job channels still subscribed, per-request keys without
a TTL, and the API's memory before and after.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson
import redis

from bench.fleet import Lab
from bench.harness import Profile
from bench.load import client
from bench.probe import rss_mb
from bench.report import Row, Target
from oshepherd.testing.fleet import Fleet

__all__ = ["soak"]

MODEL = "soak:latest"
TOKENS = 20
CONCURRENCY = 64
SLOTS = 16  # per worker: 2 workers, 32 slots for 64 clients, so jobs queue too
HANG_UP = 0.05  # share of streamed requests whose client leaves after the first line
STREAMED = 0.7
TIMEOUT = 60.0
EXPECTED = [f"tok{i} " for i in range(TOKENS)]
NEVER = Target("<=", 0, on="gateway")


@dataclass
class Tally:
    outcomes: Counter[str]
    seconds: float


def soak(lab: Lab, profile: Profile) -> list[Row]:
    with lab.fleet() as fleet:
        fleet.start_api()
        hosts = [fleet.standin_process(MODEL, tokens=TOKENS, token_delay=0.001) for _ in range(2)]
        victim = fleet.worker(hosts[0], concurrency=SLOTS)
        fleet.worker(hosts[1], concurrency=SLOTS)
        fleet.wait_for_models(MODEL, workers=2)
        api_pid = fleet.api.process.pid if fleet.api else 0
        before = rss_mb(api_pid)

        def restart() -> None:
            """SIGKILL a worker (every job it holds is cut off) and start a new one."""
            victim.kill()
            fleet.worker(hosts[0], concurrency=SLOTS)

        tally = asyncio.run(_load(fleet, profile.soak_requests, restart))
        channels, keys = _leaks(fleet)
        after = rss_mb(api_pid)
    return _rows(tally, channels, keys, before, after, profile.soak_requests)


async def _load(fleet: Fleet, total: int, restart: Callable[[], None]) -> Tally:
    outcomes: Counter[str] = Counter()
    left = total
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    restarting: asyncio.Future[None] | None = None
    rng = random.Random(7)
    async with client() as session:

        async def one_client() -> None:
            nonlocal left, restarting
            while left > 0:
                left -= 1
                if restarting is None and left <= total // 2:
                    restarting = loop.run_in_executor(None, restart)
                outcomes[await _one(session, fleet.url, rng)] += 1

        await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
        if restarting is not None:
            await restarting
    return Tally(outcomes, time.perf_counter() - started)


async def _one(session: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    stream = rng.random() < STREAMED
    hang_up = stream and rng.random() < HANG_UP
    body = orjson.dumps({"model": MODEL, "prompt": "soak", "stream": stream})
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    try:
        async with session.post(url + "/api/generate", data=body, timeout=timeout) as response:
            if response.status != 200:
                await response.read()
                return "errored"
            if hang_up:
                await response.content.readline()
                response.close()
                return "hung up"
            raw = await response.read()
    except TimeoutError:
        return "hung"
    except (aiohttp.ClientError, OSError):
        return "malformed"
    return _classify(raw, stream)


def _classify(raw: bytes, stream: bool) -> str:
    try:
        lines = [orjson.loads(line) for line in raw.splitlines()]
    except orjson.JSONDecodeError:
        return "malformed"
    if lines and "error" in lines[-1]:
        return "errored"
    if not stream:
        ok = len(lines) == 1 and lines[0].get("response") == "".join(EXPECTED)
        return "completed" if ok else "malformed"
    tokens = [line.get("response") for line in lines[:-1]]
    if tokens != EXPECTED[: len(tokens)] or len(set(tokens)) != len(tokens):
        return "duplicated"
    return "completed" if tokens == EXPECTED and lines[-1].get("done") else "malformed"


def _leaks(fleet: Fleet) -> tuple[int, int]:
    """Job channels still subscribed and per-request keys without a TTL, once idle."""
    with redis.Redis.from_url(fleet.stack.redis_url) as r:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and r.pubsub_channels("oshepherd:job:*"):
            time.sleep(0.1)
        channels = len(r.pubsub_channels("oshepherd:job:*"))
        channels += max(0, int(r.pubsub_numpat()) - 1)  # the API's own pattern is expected
        keys = [
            k
            for k in r.scan_iter("oshepherd:*")
            if r.ttl(k) == -1 and k not in (b"oshepherd:workers",)
        ]
    return channels, len(keys)


def _rows(
    tally: Tally, channels: int, keys: int, before: float, after: float, total: int
) -> list[Row]:
    o = tally.outcomes
    label = f"soak, {total:,} requests, c={CONCURRENCY}"
    rows = [
        Row("soak", f"{label}: completed", "requests", None, o["completed"]),
        Row("soak", "soak: hung up by the client (on purpose)", "requests", None, o["hung up"]),
        Row("soak", "soak: explicit errors", "requests", None, o["errored"]),
        Row("soak", "soak: hung", "requests", None, o["hung"], target=NEVER),
        Row(
            "soak",
            "soak: duplicated or out of order",
            "requests",
            None,
            o["duplicated"],
            target=NEVER,
        ),
        Row("soak", "soak: malformed", "requests", None, o["malformed"], target=NEVER),
        Row("soak", "soak: leaked job channels", "channels", None, channels, target=NEVER),
        Row("soak", "soak: leaked keys without TTL", "keys", None, keys, target=NEVER),
        Row("soak", "soak: API RSS before", "MB", None, before),
        Row("soak", "soak: API RSS after", "MB", None, after),
    ]
    rows[0].notes.append(
        f"soak: {tally.seconds:.1f} s; one of 2 workers SIGKILLed and replaced half-way; "
        f"{HANG_UP:.0%} of streams hung up after their first line"
    )
    return rows
