"""The bench's processes: one embedded Redis, and per figure a fleet of stand-ins, workers
and an API on a Redis database of its own.

Everything is a real process started the way a user would start it (``oshepherd.stack``),
and everything is stopped when the fleet or the lab closes, also on Ctrl-C or an error.
"""

from __future__ import annotations

import itertools
import resource
import subprocess
import sys
import time
from typing import IO, Any, Self

import httpx
import redis

from oshepherd.redis_server import EmbeddedRedis, free_port
from oshepherd.stack import Component, Stack

__all__ = ["Fleet", "Lab", "raise_open_file_limit"]

# Defaults otherwise (what a user runs); only the drains are short, so that a bench stopped
# by Ctrl-C or an error does not wait on them.
API_SETTINGS: dict[str, Any] = {"shutdown_grace": 2}
WORKER_SETTINGS: dict[str, Any] = {"shutdown_timeout": 5}


def raise_open_file_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one: the processes started later inherit it,
    and 1,000 streams cost each of the client, the API and the stand-in 1,000 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Lab:
    """The Redis every fleet of one bench run shares, each fleet on its own database."""

    def __init__(self, log_file: IO[bytes]) -> None:
        self._log = log_file
        self._redis = EmbeddedRedis()
        self._databases = itertools.cycle(range(1, 16))

    def __enter__(self) -> Self:
        self._redis.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._redis.close()

    def fleet(self) -> Fleet:
        """A new fleet on a freshly emptied database."""
        url = f"redis://127.0.0.1:{self._redis.port}/{next(self._databases)}"
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        return Fleet(url, self._log)


class Fleet:
    """One stack (API and workers) plus the Ollama stand-ins its workers front."""

    def __init__(self, redis_url: str, log_file: IO[bytes]) -> None:
        self.stack = Stack(redis_url, log=log_file)
        self.standins: list[Component] = []
        self.api: Component | None = None
        self._log = log_file

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def standin(
        self,
        model: str,
        *,
        tokens: int = 5,
        token_delay: float = 0.0,
        latency: float = 0.0,
        max_parallel: int | None = None,
    ) -> Component:
        """An Ollama stand-in process (``python -m oshepherd.testing.standin``) serving
        ``model``."""
        port = free_port()
        args = [
            "--port",
            str(port),
            "--models",
            model,
            "--tokens",
            str(tokens),
            "--token-delay",
            str(token_delay),
            "--latency",
            str(latency),
        ]
        if max_parallel is not None:
            args += ["--max-parallel", str(max_parallel)]
        process = subprocess.Popen(
            [sys.executable, "-m", "oshepherd.testing.standin", *args],
            stdout=self._log,
            stderr=self._log,
        )
        host = Component(f"standin-{port}", process, url=f"http://127.0.0.1:{port}")
        self.standins.append(host)
        _wait_http(host, 15.0)
        return host

    def worker(self, host: Component, concurrency: int) -> Component:
        n = len(self.stack.components)
        return self.stack.start_worker(
            host.url,
            worker_id=f"bench-w{n}-{host.process.pid}",
            concurrency=concurrency,
            **WORKER_SETTINGS,
        )

    def start_api(self, **settings: Any) -> Component:
        self.api = self.stack.start_api(**{**API_SETTINGS, **settings})
        return self.api

    @property
    def url(self) -> str:
        assert self.api is not None, "start_api() first"
        return self.api.url

    def wait_for_model(self, model: str, workers: int, timeout: float = 20.0) -> None:
        """Until the API lists ``model`` on ``workers`` workers (its registry has caught up)."""
        deadline = time.monotonic() + timeout
        while _holders(self.url, model) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not list {model} on {workers} workers")
            time.sleep(0.05)

    def pids(self) -> dict[str, list[int]]:
        """Process ids by role (api, worker, standin, redis), for CPU accounting."""
        pids: dict[str, list[int]] = {"api": [], "worker": [], "standin": []}
        for component in self.stack.components:
            pids["api" if component is self.api else "worker"].append(component.process.pid)
        pids["standin"] = [host.process.pid for host in self.standins]
        with redis.Redis.from_url(self.stack.redis_url) as client:
            pids["redis"] = [int(client.info("server")["process_id"])]
        return pids

    def close(self) -> None:
        try:
            self.stack.stop()
        finally:
            for host in self.standins:
                host.stop(timeout=5)
            self.standins.clear()


def _holders(url: str, model: str) -> int:
    try:
        models = httpx.get(url + "/api/tags", timeout=2).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError):
        return 0
    return max((len(m.get("workers", [])) for m in models if m.get("name") == model), default=0)


def _wait_http(component: Component, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not component.alive():
            raise RuntimeError(f"{component.name} exited with {component.process.returncode}")
        try:
            if httpx.get(component.url + "/", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            component.kill()
            raise TimeoutError(f"{component.name} did not answer within {timeout}s")
        time.sleep(0.05)
