"""A fleet on one machine, for the tests and the benchmarks: a ``Stack`` (the API and workers
as processes, started as a user starts them) on a Redis database of its own, and the Ollama
stand-ins its workers front.

Stand-ins run on threads of this process (``Fleet.standin``: a test steers and inspects
them) or as processes of their own (``Fleet.standin_process``: the bench accounts CPU per
process). Everything a fleet started stops with it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any, Self

import httpx
import orjson
import psutil
import redis

from oshepherd.protocol import (
    ENQUEUE_SCRIPT,
    PRIORITY_STEP,
    Job,
    celery_message,
    job_channel,
    model_queue,
    new_id,
)
from oshepherd.redis_server import EmbeddedRedis, free_port
from oshepherd.stack import Component, Stack, answers, wait_until
from oshepherd.testing.standin import StandIn

__all__ = ["Fleet", "fresh_database"]

# Redis has databases 0–15; 0 keeps the count of those handed out, under a name outside the
# wire's "oshepherd:" namespace.
DATABASES = 15
COUNTER = "oshepherd-testing:databases"


def fresh_database(server: EmbeddedRedis) -> str:
    """The URL of one of ``server``'s databases 1–15, in turn, emptied first: fleets that
    share a server never share queues or a registry. The turn is counted in the server's
    database 0, so callers keep no state of their own to share one server."""
    with redis.Redis.from_url(server.url) as client:
        number = 1 + (int(client.incr(COUNTER)) - 1) % DATABASES
    url = f"redis://127.0.0.1:{server.port}/{number}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


class Fleet:
    """A stack on ``redis_url`` plus the stand-ins its workers front; processes log to
    ``log``. Every API and every worker starts with ``api`` / ``worker`` settings (keyword
    names of ``ApiSettings`` / ``WorkerSettings``), which a call's own settings override."""

    def __init__(
        self,
        redis_url: str,
        log: IO[bytes] | None = None,
        *,
        api: Mapping[str, Any] | None = None,
        worker: Mapping[str, Any] | None = None,
    ) -> None:
        self.stack = Stack(redis_url, log=log)
        self.api: Component | None = None
        self.standins: list[StandIn] = []
        self.standin_processes: list[Component] = []
        self._log = log
        self._api_settings = dict(api or {})
        self._worker_settings = dict(worker or {})

    @property
    def url(self) -> str:
        """The API's base URL, e.g. ``http://127.0.0.1:40123``."""
        assert self.api is not None, "start_api() first"
        return self.api.url

    def standin(self, *models: str, **options: Any) -> StandIn:
        """A stand-in serving ``models`` on a thread of this process; ``options`` are
        ``StandIn``'s (``latency``, ``tokens``, ``max_parallel``...)."""
        host = StandIn(models, name=f"host{len(self.standins)}", **options).start()
        self.standins.append(host)
        return host

    def standin_process(
        self,
        *models: str,
        tokens: int = 5,
        token_delay: float = 0.0,
        latency: float = 0.0,
        max_parallel: int | None = None,
        load_time: float = 0.0,
    ) -> Component:
        """A stand-in serving ``models`` as a process of its own, once it answers."""
        port = free_port()
        args = ["--port", str(port), "--models", ",".join(models), "--tokens", str(tokens)]
        args += ["--token-delay", str(token_delay), "--latency", str(latency)]
        args += ["--load-time", str(load_time)]
        if max_parallel is not None:
            args += ["--max-parallel", str(max_parallel)]
        command = [sys.executable, "-m", "oshepherd.testing.standin", *args]
        process = subprocess.Popen(command, stdout=self._log, stderr=self._log)
        host = Component(f"standin-{port}", process, url=f"http://127.0.0.1:{port}")
        self.standin_processes.append(host)
        host.wait_ready(lambda: answers(host.url), 15)
        return host

    def start_api(self, **settings: Any) -> Component:
        """The fleet's API (once it answers); ``settings`` override the fleet's."""
        self.api = self.stack.start_api(**{**self._api_settings, **settings})
        return self.api

    def worker(self, host: StandIn | Component, **settings: Any) -> Component:
        """A worker in front of ``host`` (once registered); ``settings`` override the
        fleet's."""
        return self.stack.start_worker(host.url, **{**self._worker_settings, **settings})

    def wait_for_models(self, *names: str, workers: int = 1, timeout: float = 20.0) -> None:
        """Until the API lists every one of ``names`` (full names: ``llama3:latest``) on at
        least ``workers`` workers: its view of the fleet has caught up. TimeoutError if not
        within ``timeout`` seconds."""
        wanted = ", ".join(names)
        what = f"{wanted} listed on {workers} worker(s)"
        wait_until(lambda: self._listed(names, workers), timeout, what)

    def enqueue_generates(
        self, model: str, prompts: Iterable[str], *, tenant: str = "", level: str = "normal"
    ) -> list[int]:
        """Queue a non-streamed generate of ``model`` (normalized) per prompt, as the API
        queues a job (``ENQUEUE_SCRIPT`` with ``celery_message``, on the list of ``tenant``
        and the priority ``level``), in one round trip; nobody follows their answers. The
        lists' new depths (-1: a list was full)."""
        with redis.Redis.from_url(self.stack.redis_url) as client, client.pipeline() as pipe:
            for prompt in prompts:
                job_id = new_id()
                body = orjson.dumps({"model": model, "prompt": prompt, "stream": False})
                job = Job(
                    job_id, job_channel("fleet", job_id), "POST", "/api/generate", body.decode(),
                    model, None, queue=model_queue(model, tenant), tenant=tenant,
                    priority=PRIORITY_STEP[level],
                )  # fmt: skip
                pipe.eval(ENQUEUE_SCRIPT, 1, job.key, celery_message(job), 10_000)
            return [int(depth) for depth in pipe.execute()]

    def _listed(self, names: tuple[str, ...], workers: int) -> bool:
        models = httpx.get(self.url + "/api/tags", timeout=5).json()["models"]
        holders = {model["name"]: len(model["workers"]) for model in models}
        return all(holders.get(name, 0) >= workers for name in names)

    def pids(self) -> dict[str, list[int]]:
        """Process ids by role (``api``, ``worker``, ``standin``, ``redis``), for CPU
        accounting; ``api`` first the API's own, then, with ``API_PROCESSES`` above 1, those
        its supervisor started. Stand-ins on threads of this process are not among them."""
        pids: dict[str, list[int]] = {"api": [], "worker": []}
        for component in self.stack.components:
            pids["api" if component is self.api else "worker"].append(component.process.pid)
        if self.api is not None:
            pids["api"] += [p.pid for p in psutil.Process(self.api.process.pid).children()]
        pids["standin"] = [host.process.pid for host in self.standin_processes]
        with redis.Redis.from_url(self.stack.redis_url) as client:
            pids["redis"] = [int(client.info("server")["process_id"])]
        return pids

    def stop(self) -> None:
        """Workers, then the API (``Stack.stop``), then every stand-in."""
        try:
            self.stack.stop()
        finally:
            for host in self.standins:
                host.stop()
            for process in self.standin_processes:
                process.stop(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
