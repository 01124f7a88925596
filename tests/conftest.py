"""Real components for every test: a redis-server, the API and workers as processes, and
Ollama stand-ins (the one test double: an external system we cannot install here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import ollama
import pytest

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet, fresh_database

# Fast heartbeats so that the tests see fleet changes quickly; slots to spare.
WORKER_SETTINGS: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "ping_interval": 0.5,
    "concurrency": 4,
}


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """``oshepherd.stack.wait_until`` for a test on the event loop: poll ``predicate``
    every 10 ms without blocking the loop; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


def tag_names(url: str) -> set[str]:
    return {m["name"] for m in httpx.get(url + "/api/tags", timeout=5).json()["models"]}


@pytest.fixture
def anyio_backend() -> str:
    """The loop of the anyio tests: asyncio, as the API's and the workers' (uvloop's)."""
    return "asyncio"


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, which it may stop and start again."""
    running = EmbeddedRedis().start()
    yield running
    running.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def stack_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IO[bytes]]:
    path: Path = tmp_path_factory.mktemp("logs") / "stack.log"
    with path.open("ab") as log:
        yield log


def new_fleet(server: EmbeddedRedis, log: IO[bytes]) -> Fleet:
    """A fleet on a Redis database of its own, emptied first: fleets never share queues."""
    return Fleet(fresh_database(server), log, worker=WORKER_SETTINGS)


def _listed(models: Iterable[str]) -> list[str]:
    """``models`` as ``/api/tags`` lists them: with ``:latest`` when they have no tag."""
    return [m if ":" in m.rpartition("/")[2] else f"{m}:latest" for m in models]


@contextmanager
def one_host(server: EmbeddedRedis, log: IO[bytes], *models: str, **api: Any) -> Iterator[Fleet]:
    """The smallest fleet: a host with ``models``, its worker, one API (``api``: its
    settings)."""
    fleet = new_fleet(server, log)
    try:
        host = fleet.standin(*models)
        fleet.start_api(**api)
        fleet.worker(host)
        fleet.wait_for_models(*_listed(models))
        yield fleet
    finally:
        fleet.stop()


@contextmanager
def two_hosts(
    server: EmbeddedRedis,
    log: IO[bytes],
    first: Sequence[str],
    second: Sequence[str],
    worker_ids: tuple[str | None, str | None] = (None, None),
    **second_host: Any,
) -> Iterator[Fleet]:
    """The usual fleet: two hosts with the given models, a worker each, one API."""
    fleet = new_fleet(server, log)
    try:
        hosts = [fleet.standin(*first), fleet.standin(*second, **second_host)]
        fleet.start_api()
        for host, worker_id in zip(hosts, worker_ids, strict=True):
            fleet.worker(host, worker_id=worker_id)
        fleet.wait_for_models(*_listed({*first, *second}))
        yield fleet
    finally:
        fleet.stop()


@contextmanager
def busy_and_other(server: EmbeddedRedis, log: IO[bytes]) -> Iterator[Fleet]:
    """The fleet the fleet API and the dashboard are watched on: host0 serves llama3, each
    answer 1 s late, behind a worker of one slot (``busy``), so its queue fills; host1
    serves qwen2:7b (worker ``other``)."""
    fleet = new_fleet(server, log)
    try:
        busy = fleet.standin("llama3", latency=1.0)
        other = fleet.standin("qwen2:7b")
        fleet.start_api()
        fleet.worker(busy, worker_id="busy", concurrency=1)
        fleet.worker(other, worker_id="other")
        fleet.wait_for_models("llama3:latest", "qwen2:7b")
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def client(fleet: Fleet) -> ollama.Client:
    """An ollama-python client of the module's ``fleet``, with the hosts' counters zeroed."""
    for host in fleet.standins:
        host.reset_counters()
    return ollama.Client(host=fleet.url)


@pytest.fixture
def make_fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Callable[[], Fleet]]:
    """Fleets that are torn down after the test."""
    fleets: list[Fleet] = []

    def make() -> Fleet:
        fleets.append(new_fleet(redis_server, stack_log))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.stop()
