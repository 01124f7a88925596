"""Real components for every test: a redis-server, the API and workers as processes, and
Ollama stand-ins (the one test double: an external system we cannot install here)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import ollama
import pytest
import redis

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import Component, Stack, wait_until
from oshepherd.testing.standin import StandIn

# Fast heartbeats so that the tests see fleet changes quickly.
WORKER_SETTINGS: dict[str, Any] = {"heartbeat_interval": 0.5, "ping_interval": 0.5}


def tag_names(url: str) -> set[str]:
    return {m["name"] for m in httpx.get(url + "/api/tags", timeout=5).json()["models"]}


class Fleet:
    """A stack on the session's Redis, plus the stand-ins its workers front."""

    def __init__(self, redis_url: str, log: IO[bytes]) -> None:
        self.stack = Stack(redis_url, log=log)
        self.standins: list[StandIn] = []
        self.api: Component | None = None

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.url

    def standin(self, *models: str, **options: Any) -> StandIn:
        host = StandIn(models, name=f"host{len(self.standins)}", **options).start()
        self.standins.append(host)
        return host

    def worker(self, host: StandIn, concurrency: int = 4, **settings: Any) -> Component:
        return self.stack.start_worker(
            host.url, concurrency=concurrency, **{**WORKER_SETTINGS, **settings}
        )

    def start_api(self, **settings: Any) -> Component:
        self.api = self.stack.start_api(**settings)
        return self.api

    def wait_for_models(self, *names: str, timeout: float = 15.0) -> None:
        wanted = set(names)
        wait_until(lambda: wanted <= tag_names(self.url), timeout, f"models {wanted} listed")

    def stop(self) -> None:
        self.stack.stop()
        for host in self.standins:
            host.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def stack_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IO[bytes]]:
    path: Path = tmp_path_factory.mktemp("logs") / "stack.log"
    with path.open("ab") as log:
        yield log


_databases = itertools.cycle(range(1, 16))


def new_fleet(server: EmbeddedRedis, log: IO[bytes]) -> Fleet:
    """A fleet on a Redis database of its own, emptied first: fleets never share queues."""
    url = f"redis://127.0.0.1:{server.port}/{next(_databases)}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return Fleet(url, log)


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
        fleet.wait_for_models(
            *(m if ":" in m.rpartition("/")[2] else f"{m}:latest" for m in {*first, *second})
        )
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
