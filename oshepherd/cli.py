"""``oshepherd``: start-api, start-worker, and up (the whole stack in one command)."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Any

import click

from oshepherd.config import ApiSettings, WorkerSettings, load, redacted
from oshepherd.stack import Stack, StartError

__all__ = ["main"]

log = logging.getLogger("oshepherd")

ENV_FILE = click.option(
    "--env-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read settings from this file; environment variables override it.",
)


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


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
def up(
    ollama_urls: tuple[str, ...], port: int, host: str, concurrency: int, redis_url: str | None
) -> None:
    """Run the whole stack here: Redis (embedded unless given), the API, one worker per host.

    A part that cannot start (the port is taken, Redis does not answer...) stops the parts
    already started, and the command fails with one line saying why; so does a part that
    exits while the stack runs. Ctrl-C or SIGTERM stops the stack cleanly (exit 0).
    """
    _logging("INFO")
    with Stack(redis_url) as stack:
        try:
            _start(stack, ollama_urls, host=host, port=port, concurrency=concurrency)
        except StartError as exc:
            raise click.ClickException(f"{exc}; stopped what had started") from exc
        exited = stack.wait()
        log.info("stopping")
    if exited is not None:
        code = exited.process.returncode
        raise click.ClickException(f"{exited.name} exited with code {code}; stopped the stack")


def _start(
    stack: Stack, ollama_urls: tuple[str, ...], *, host: str, port: int, concurrency: int
) -> None:
    """Start every part of ``stack``; raises ``StartError``."""
    stack.start_redis()
    where = "embedded" if stack.embedded_redis else "external"
    log.info("Redis (%s) at %s", where, redacted(stack.redis_url))
    api = stack.start_api(host=host, port=port)
    for n, ollama in enumerate(ollama_urls):
        worker = stack.start_worker(
            ollama, worker_id=f"{socket.gethostname()}-w{n}", concurrency=concurrency
        )
        log.info("worker %s serves %s", worker.meta["id"], ollama)
    log.info("oshepherd is up at %s; Ctrl-C stops it", api.url)
