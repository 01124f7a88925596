"""A whole oshepherd stack on one machine: Redis (embedded if need be), the API, workers.

``oshepherd up`` runs one; the test suite and the benchmarks run theirs with it too, so
what they exercise is exactly what a user starts. Every component is a real process,
configured through the same environment variables a user would set. ``wait_until`` is the
one wait for a condition, of the stack, the tests and the benchmarks alike.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import httpx
import psutil
import redis

from oshepherd.config import env_names, redacted
from oshepherd.connections import sync_redis
from oshepherd.protocol import worker_key
from oshepherd.redis_server import EmbeddedRedis, free_port

__all__ = [
    "Component",
    "Stack",
    "StartError",
    "answers",
    "die_with_parent",
    "listens",
    "wait_until",
]

_T = TypeVar("_T")
# What a component that is still starting, or a Redis coming back, answers: not yet.
_NOT_YET = (httpx.HTTPError, redis.RedisError, OSError)


def wait_until(
    predicate: Callable[[], _T],
    timeout: float,
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    interval: float = 0.02,
) -> _T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that. httpx, Redis and OS errors it raises count as "not yet".

    Raises ``TimeoutError`` naming ``what`` (``"api ready"``) once ``timeout`` seconds
    have passed, chained to the last error the predicate raised, if any; and
    ``RuntimeError`` at once if ``process`` (the one being waited for) has exited.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process {process.pid} exited with {process.returncode}")
        try:
            result = predicate()
        except _NOT_YET as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s") from last_error
        time.sleep(interval)


@dataclass
class Component:
    """One process of the stack."""

    name: str
    process: subprocess.Popen[bytes]
    url: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL, as a crash or an OOM kill would."""
        self.signal(signal.SIGKILL)
        return self.process.wait()

    def wait_ready(self, ready: Callable[[], object], timeout: float) -> None:
        """Until ``ready()`` is truthy (``wait_until``): RuntimeError at once if the process
        exits; TimeoutError after ``timeout`` seconds, the process then killed."""
        try:
            wait_until(ready, timeout, f"{self.name} ready", process=self.process)
        except TimeoutError:
            self.kill()
            raise


class StartError(RuntimeError):
    """A part of the stack did not start; the message says which and why, in one line."""


def answers(url: str) -> bool:
    """Whether the HTTP server at base ``url`` answers ``GET /`` with 200 within a second
    (the API and Ollama both do once up); httpx errors propagate."""
    return httpx.get(url + "/", timeout=1).status_code == 200


def listens(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``process`` itself has a listening TCP socket on ``port``: what answers
    there is that process, not another server that had the port first."""
    try:
        sockets = psutil.Process(process.pid).net_connections(kind="inet")
    except psutil.Error:
        return False
    return any(s.status == psutil.CONN_LISTEN and s.laddr.port == port for s in sockets)


def _check_port(host: str, port: int) -> None:
    """Raise ``StartError`` if ``host:port`` cannot be bound (taken, or no such address),
    as the API's server would find when it binds it (with ``SO_REUSEADDR``, as uvicorn)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartError(f"port {port} on {host} is already in use") from exc
            raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


class Stack:
    def __init__(self, redis_url: str | None = None, *, log: IO[bytes] | int | None = None) -> None:
        self._embedded: EmbeddedRedis | None = None
        self.redis_url = redis_url or ""
        self.components: list[Component] = []
        self._log = log

    def start_redis(self) -> str:
        """Start an embedded Redis unless a URL was given, else check that Redis answers;
        returns the URL in use. Raises ``StartError``."""
        if self.redis_url:
            try:
                with sync_redis(self.redis_url, socket_connect_timeout=5) as client:
                    client.ping()
            except redis.RedisError as exc:
                where = redacted(self.redis_url)
                raise StartError(f"Redis at {where} does not answer: {exc}") from exc
            return self.redis_url
        self._embedded = EmbeddedRedis()  # before it starts: stop() closes it in any case
        try:
            self._embedded.start()
        except (RuntimeError, redis.RedisError) as exc:
            raise StartError(f"the embedded Redis did not start: {exc}") from exc
        self.redis_url = self._embedded.url
        return self.redis_url

    @property
    def embedded_redis(self) -> EmbeddedRedis | None:
        return self._embedded

    def start_api(self, *, host: str = "127.0.0.1", port: int | None = None, wait: float = 20.0,
                  **settings: Any) -> Component:  # fmt: skip
        """The API on ``host:port`` (a free port if None), once it listens there itself and
        answers. Raises ``StartError``: the port is taken, or the API exited or was not
        ready within ``wait`` seconds."""
        port = port or free_port()
        _check_port(host, port)
        env = self._env(HOST=host, PORT=port, **settings)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        api = self._spawn("api", ["start-api"], env, url=url)
        _ready(api, lambda: listens(api.process, port) and answers(url), wait)
        return api

    def start_worker(self, ollama_url: str, *, worker_id: str | None = None, wait: float = 30.0,
                     **settings: Any) -> Component:  # fmt: skip
        worker_id = worker_id or f"worker-{len(self.components)}-{os.getpid()}"
        env = self._env(OLLAMA_BASE_URL=ollama_url, WORKER_ID=worker_id, **settings)
        worker = self._spawn(worker_id, ["start-worker"], env, meta={"id": worker_id})
        _ready(worker, lambda: self._registered(worker_id), wait)
        return worker

    def _registered(self, worker_id: str) -> bool:
        with sync_redis(self.redis_url, socket_connect_timeout=2) as client:
            return bool(client.exists(worker_key(worker_id)))

    def _env(self, **settings: Any) -> dict[str, str]:
        # The caller's own settings must not leak into the stack's processes.
        settings_names = env_names()
        env = {k: v for k, v in os.environ.items() if k.upper() not in settings_names}
        env["CELERY_BROKER_URL"] = self.redis_url
        env.update({k.upper(): str(v) for k, v in settings.items()})
        return env

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str], **kw: Any) -> Component:
        command = [sys.executable, "-m", "oshepherd", *args]
        process = subprocess.Popen(
            command, env=dict(env), stdout=self._log, stderr=self._log, preexec_fn=die_with_parent
        )
        component = Component(name, process, **kw)
        self.components.append(component)
        return component

    def wait(self) -> Component | None:
        """Block until Ctrl-C (SIGINT) or SIGTERM (None), or until a component or the
        embedded Redis exits (that one; the embedded Redis as a ``Component`` named "the
        embedded Redis"). SIGINT is handled even when this process started with it ignored
        (a background job of a non-interactive shell)."""

        def on_signal(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        watched = list(self.components)
        if self._embedded is not None and self._embedded.process is not None:
            watched.append(Component("the embedded Redis", self._embedded.process))
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                exited = [c for c in watched if not c.alive()]
                if exited:
                    return exited[0]
                time.sleep(0.2)
        except KeyboardInterrupt:
            return None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self) -> None:
        """Workers first (they finish their jobs), then the API, then Redis."""
        for component in reversed(self.components):
            component.signal(signal.SIGTERM)
        for component in reversed(self.components):
            component.stop()
        self.components.clear()
        if self._embedded is not None:
            self._embedded.close()
            self._embedded = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(component: Component, ready: Callable[[], object], timeout: float) -> None:
    """``component.wait_ready``, its failure as a ``StartError`` naming the component."""
    try:
        component.wait_ready(ready, timeout)
    except RuntimeError as exc:
        code = component.process.returncode
        raise StartError(f"{component.name} exited with code {code} before it was ready") from exc
    except TimeoutError as exc:
        raise StartError(f"{component.name} was not ready within {timeout:g}s") from exc


def die_with_parent() -> None:
    """Linux: a component (or an API process under its supervisor) gets SIGTERM when
    whoever started it dies, even by SIGKILL, so a killed ``oshepherd up`` or test run
    leaves no orphans behind."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1
