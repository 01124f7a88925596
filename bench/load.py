"""The load generator: aiohttp clients on one uvloop, the same code for both paths.

A figure runs it once against a stand-in (direct) and once against the API (gateway); only
the base URL differs. Every loop ends by itself, after a count of requests or a duration.
Each request is checked (status 200, a final ``done: true``, the expected number of
lines), so a fast wrong answer counts as an error, not as throughput.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

__all__ = ["Call", "Request", "Run", "Sample", "client", "closed_loop", "done_check", "request"]

HEADERS = {"Content-Type": "application/json"}
TAIL = 1024  # bytes kept from the end of a stream: enough for its last line
REQUEST_TIMEOUT = 180.0


@dataclass(slots=True)
class Sample:
    """One request: seconds from sending it to its first complete line and to its end."""

    start: float
    first: float
    end: float
    lines: int
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class Run:
    """The samples of one load run, with the window in which requests were being issued."""

    samples: list[Sample]
    started: float
    stopped: float
    finished: float
    client_cpu: float  # CPU seconds the load generator itself used
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by role, if measured

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if not s.error]

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.samples if s.error]

    def rate(self, warmup: float, per: Callable[[Sample], float] = lambda s: 1.0) -> float:
        """Sum of ``per(sample)`` over good requests that ended between ``started + warmup``
        and ``stopped``, per second: no ramp-up, no drain."""
        lo, hi = self.started + warmup, self.stopped
        return sum(per(s) for s in self.ok if lo <= s.end <= hi) / max(hi - lo, 1e-9)

    @property
    def client_load(self) -> float:
        """Share of one core the load generator used: near 1.0 means it was the bottleneck."""
        return self.client_cpu / max(self.finished - self.started, 1e-9)


Call = Callable[[], Awaitable[Sample]]


def done_check(line: bytes) -> str:
    """The last (or only) object of a generation must be ``done: true``, not an error;
    returns what is wrong, or ``""``."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return f"last line is not JSON: {line[:120]!r}"
    if not isinstance(obj, dict) or "error" in obj:
        return f"error answer: {line[:200]!r}"
    return "" if obj.get("done") is True else f"not done: {line[:120]!r}"


@dataclass
class Request:
    """What to send, and what a correct answer looks like."""

    url: str
    body: bytes
    stream: bool
    lines: int | None = None  # exact number of NDJSON lines expected, when known
    check: Callable[[bytes], str] = field(default_factory=lambda: done_check, repr=False)
    on_first: Callable[[], None] | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict)  # beside HEADERS (an API key...)


def client(connections: int = 0) -> aiohttp.ClientSession:
    """A keep-alive client with no connection cap (0) unless one is given."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ttl_dns_cache=None),
        # Every request ends by itself, even one the gateway would never answer.
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=10),
        skip_auto_headers=("User-Agent",),
    )


async def request(session: aiohttp.ClientSession, req: Request) -> Sample:
    """Send one request and read it to the end; failures come back as ``Sample.error``."""
    start = time.perf_counter()
    try:
        headers = {**HEADERS, **req.headers} if req.headers else HEADERS
        async with session.post(req.url, data=req.body, headers=headers) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                return Sample(
                    start, start, time.perf_counter(), 0, f"HTTP {response.status}: {text}"
                )
            if req.stream:
                return await _read_stream(response, req, start)
            body = await response.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Sample(start, start, time.perf_counter(), 0, repr(exc))
    end = time.perf_counter()
    return Sample(start, end, end, 1, req.check(body))


async def _read_stream(response: aiohttp.ClientResponse, req: Request, start: float) -> Sample:
    first, lines, tail = 0.0, 0, b""
    async for chunk in response.content.iter_any():
        count = chunk.count(b"\n")
        if count and not first:
            first = time.perf_counter()
            if req.on_first is not None:
                req.on_first()
        lines += count
        tail = (tail + chunk)[-TAIL:]
    end = time.perf_counter()
    error = req.check(tail.rstrip(b"\n").rpartition(b"\n")[2])
    if not error and req.lines is not None and lines != req.lines:
        error = f"{lines} lines, expected {req.lines}"
    return Sample(start, first or end, end, lines, error)


async def closed_loop(
    call: Call, concurrency: int, *, count: int | None = None, seconds: float | None = None
) -> Run:
    """``concurrency`` clients, each sending its next request when the last one ended, until
    ``count`` requests have been sent or ``seconds`` have passed."""
    if count is None and seconds is None:
        raise ValueError("closed_loop needs a count or a duration")
    samples: list[Sample] = []
    left = count if count is not None else -1
    cpu0, started = time.process_time(), time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")

    async def one_client() -> None:
        nonlocal left
        while left != 0 and time.perf_counter() < deadline:
            left -= 1
            samples.append(await call())

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    finished = time.perf_counter()
    stopped = min(deadline, finished)
    return Run(samples, started, stopped, finished, time.process_time() - cpu0)
