"""``oshepherd``: start-api, start-worker, and up (the whole stack in one command)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click

from oshepherd.config import ApiSettings, WorkerSettings, load
from oshepherd.redis_server import EmbeddedRedis

__all__ = ["main"]

log = logging.getLogger("oshepherd")

ENV_FILE = click.option(
    "--env-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read settings from this file (the environment still wins over defaults).",
)


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings(cls: type[Any], env_file: Path | None, **overrides: Any) -> Any:
    try:
        return load(cls, env_file, **overrides)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group()
@click.version_option(package_name="oshepherd")
def main() -> None:
    """One Ollama endpoint in front of a fleet of Ollama hosts."""


@main.command("start-api")
@ENV_FILE
@click.option("--host", help="Interface to listen on [HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [PORT, default 5001].")
@click.option("--redis-url", "celery_broker_url", help="Redis URL [CELERY_BROKER_URL].")
@click.option("--loglevel", help="Log level [LOGLEVEL, default INFO].")
def start_api(env_file: Path | None, **overrides: Any) -> None:
    """Serve the Ollama API, queueing jobs for the workers."""
    from oshepherd.api.app import serve

    settings: ApiSettings = _settings(ApiSettings, env_file, **overrides)
    _logging(settings.loglevel)
    serve(settings)


@main.command("start-worker")
@ENV_FILE
@click.option("--ollama", "ollama_base_url", help="Local Ollama [OLLAMA_BASE_URL].")
@click.option("--concurrency", type=int, help="Slots: jobs run at once [CONCURRENCY, default 1].")
@click.option("--redis-url", "celery_broker_url", help="Redis URL [CELERY_BROKER_URL].")
@click.option("--worker-id", help="Unique id in the fleet [WORKER_ID, default host-pid].")
@click.option("--loglevel", help="Log level [LOGLEVEL, default INFO].")
def start_worker(env_file: Path | None, **overrides: Any) -> None:
    """Take jobs for the models of one Ollama host."""
    from oshepherd.worker.celery_app import run_worker

    settings: WorkerSettings = _settings(WorkerSettings, env_file, **overrides)
    _logging(settings.loglevel)
    sys.exit(run_worker(settings))


@main.command("up")
@click.option(
    "--ollama",
    "ollama_urls",
    multiple=True,
    default=["http://127.0.0.1:11434"],
    show_default=True,
    help="An Ollama host to put a worker beside; repeat for several.",
)
@click.option("--port", type=int, default=5001, show_default=True, help="API port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="API interface.")
@click.option("--concurrency", type=int, default=1, show_default=True, help="Slots per worker.")
@click.option(
    "--redis-url",
    envvar="CELERY_BROKER_URL",
    help="Use this Redis instead of starting an embedded one [CELERY_BROKER_URL].",
)
def up(ollama_urls: tuple[str, ...], port: int, host: str, concurrency: int, redis_url: str | None) -> None:
    """Run the whole stack here: Redis (embedded unless given), the API, one worker per host."""
    _logging("INFO")
    embedded = None if redis_url else EmbeddedRedis().start()
    url = redis_url or (embedded.url if embedded else "")
    env = {**os.environ, "CELERY_BROKER_URL": url}
    cmd = [sys.executable, "-m", "oshepherd"]
    children = [subprocess.Popen([*cmd, "start-api", "--host", host, "--port", str(port)], env=env)]
    for n, ollama in enumerate(ollama_urls):
        args = ["--ollama", ollama, "--concurrency", str(concurrency), "--worker-id", f"{socket.gethostname()}-w{n}"]
        children.append(subprocess.Popen([*cmd, "start-worker", *args], env=env))
    log.info("oshepherd is up: http://%s:%d (Redis %s)", host, port, "embedded" if embedded else "external")
    try:
        _wait(children)
    finally:
        _stop(children)
        if embedded is not None:
            embedded.close()


def _wait(children: list[subprocess.Popen[bytes]]) -> None:
    """Until Ctrl-C, SIGTERM or a child's exit."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        log.error("a component exited; stopping the stack")
    except KeyboardInterrupt:
        log.info("stopping")


def _stop(children: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
