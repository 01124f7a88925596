"""``oshepherd``: start-api, start-worker, up (the whole stack in one command), keys,
usage, worker-acl, and status and pull (``oshepherd.remote``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import redis
import rich.console
import rich.table

from oshepherd import logs, remote, usage
from oshepherd.acl import aclfile_line, quote, setuser_command
from oshepherd.config import ApiSettings, CommonSettings, WorkerSettings, load, redacted
from oshepherd.connections import async_redis, sync_redis
from oshepherd.keys import ApiKey, InvalidKey, KeyStore, UnknownKey, public
from oshepherd.stack import Stack, StartError

__all__ = ["main"]

log = logging.getLogger("oshepherd")

ENV_FILE = click.option(
    "--env-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read settings from this file; environment variables override it.",
)


def _logging(level: str, log_format: logs.LogFormat = "text") -> None:
    logs.configure(level, log_format)


def _settings(cls: type[Any], env_file: Path | None, **overrides: Any) -> Any:
    try:
        return load(cls, env_file, **overrides)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def cores() -> int:
    """The CPU cores this process may run on (its affinity), at least 1."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13
        return int(os.process_cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
@click.option(
    "--workers",
    "api_processes",
    type=click.IntRange(1, 256),
    help="API processes on the port, e.g. one per core [API_PROCESSES, default 1].",
)
def start_api(env_file: Path | None, **overrides: Any) -> None:
    """Serve the Ollama API, queueing jobs for the workers."""
    from oshepherd.api.app import serve

    settings: ApiSettings = _settings(ApiSettings, env_file, **overrides)
    _logging(settings.loglevel, settings.log_format)
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
    _logging(settings.loglevel, settings.log_format)
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
    "--api-processes",
    type=click.IntRange(1, 256),
    envvar="API_PROCESSES",
    default=cores,
    show_default="the cores this process may use",
    help="API processes on the port [API_PROCESSES].",
)
@click.option(
    "--redis-url",
    envvar="CELERY_BROKER_URL",
    help="Use this Redis instead of starting an embedded one [CELERY_BROKER_URL].",
)
def up(
    ollama_urls: tuple[str, ...],
    port: int,
    host: str,
    concurrency: int,
    api_processes: int,
    redis_url: str | None,
) -> None:
    """Run the whole stack here: Redis (embedded unless given), the API, one worker per host.

    A part that cannot start (the port is taken, Redis does not answer...) stops the parts
    already started, and the command fails with one line saying why; so does a part that
    exits while the stack runs. Ctrl-C or SIGTERM stops the stack cleanly (exit 0).
    """
    _logging("INFO")
    with Stack(redis_url) as stack:
        try:
            _start(
                stack,
                ollama_urls,
                host=host,
                port=port,
                concurrency=concurrency,
                api_processes=api_processes,
            )
        except StartError as exc:
            raise click.ClickException(f"{exc}; stopped what had started") from exc
        exited = stack.wait()
        log.info("stopping")
    if exited is not None:
        code = exited.process.returncode
        raise click.ClickException(f"{exited.name} exited with code {code}; stopped the stack")


def _start(
    stack: Stack,
    ollama_urls: tuple[str, ...],
    *,
    host: str,
    port: int,
    concurrency: int,
    api_processes: int,
) -> None:
    """Start every part of ``stack``; raises ``StartError``."""
    stack.start_redis()
    where = "embedded" if stack.embedded_redis else "external"
    log.info("Redis (%s) at %s", where, redacted(stack.redis_url))
    api = stack.start_api(host=host, port=port, api_processes=api_processes)
    for n, ollama in enumerate(ollama_urls):
        worker = stack.start_worker(
            ollama, worker_id=f"{socket.gethostname()}-w{n}", concurrency=concurrency
        )
        log.info("worker %s serves %s", worker.meta["id"], ollama)
    log.info("oshepherd is up at %s (API processes: %d); Ctrl-C stops it", api.url, api_processes)


class _Limit(click.ParamType):
    """A positive integer, or ``none`` (no limit: what ``keys update`` uses to remove one)."""

    name = "N|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value is None:
            return value
        if str(value).strip().lower() == "none":
            return None
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is not a positive integer or 'none'", param, ctx)
        return number


def _key_options(command: Any) -> Any:
    """The fields of a key, as ``keys create`` and ``keys update`` take them."""
    options = [
        click.option("--name", help="A name for people (need not be unique)."),
        click.option("--scope", type=click.Choice(["user", "admin"]),
                     help="user: inference, listing, show; admin: also pull, push, create, "
                          "copy, delete, blobs, /oshepherd/* and key management [user]."),
        click.option("--models", metavar="GLOB[,GLOB...]",
                     help="Models the key may use, fnmatch globs on names ('llama3*,qwen*'; "
                          "'llama3' is 'llama3:latest'); '' for every model [every model]."),
        click.option("--priority", type=click.Choice(["high", "normal", "low"]),
                     help="The key's level, and the most X-Oshepherd-Priority may ask [normal]."),
        click.option("--max-concurrent", type=_Limit(),
                     help="Requests at once, running and queued; 'none': no limit."),
        click.option("--rpm", type=_Limit(), help="Requests per minute; 'none': no limit."),
        click.option("--tokens-per-day", type=_Limit(),
                     help="Prompt plus completion tokens per day; 'none': no limit."),
        click.option("--allow-ips", metavar="CIDR[,CIDR...]",
                     help="Client addresses that may use the key; '' for any [any]."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _given(values: dict[str, Any], ctx: click.Context) -> dict[str, Any]:
    """The key fields set on the command line (a limit given as 'none' included)."""
    source = click.core.ParameterSource.COMMANDLINE
    return {k: v for k, v in values.items() if ctx.get_parameter_source(k) == source}


@contextmanager
def _key_store(env_file: Path | None, redis_url: str | None) -> Iterator[KeyStore]:
    """The key store in the Redis that ``start-api`` would use; Redis and key errors as
    click's (a bad field is a usage error)."""
    settings: ApiSettings = _settings(ApiSettings, env_file, celery_broker_url=redis_url)
    try:
        with sync_redis(settings.redis, socket_connect_timeout=5) as client:
            yield KeyStore(client)
    except InvalidKey as exc:
        raise click.UsageError(str(exc)) from exc
    except UnknownKey as exc:
        raise click.ClickException(str(exc)) from exc
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis at {redacted(settings.redis)}: {exc}") from exc


TABLE_WIDTH = 200  # columns of `keys list` when its output is not a terminal
REDIS_URL = click.option("--redis-url", help="Redis URL [CELERY_BROKER_URL, REDIS_URL].")


@main.group("keys")
def keys_group() -> None:
    """API keys: once one exists, every request needs one (docs/keys.md).

    Keys live hashed in the Redis of start-api (--env-file and the environment, as
    start-api reads them); a change reaches every API replica within a second.
    """


@keys_group.command("create")
@ENV_FILE
@REDIS_URL
@_key_options
@click.pass_context
def keys_create(
    ctx: click.Context, env_file: Path | None, redis_url: str | None, **values: Any
) -> None:
    """Create a key; its secret is printed once, alone on the last line."""
    given = _given(values, ctx)
    if "name" not in given:
        raise click.UsageError("a key needs a name: --name NAME")
    with _key_store(env_file, redis_url) as store:
        secret, key = store.create(given)
    click.echo(f"Created key {key.id} ({key.name!r}, scope {key.scope}). Its secret, shown")
    click.echo("only now (requests send it as 'Authorization: Bearer <key>' or 'x-api-key'):")
    click.echo(secret)


@keys_group.command("list")
@ENV_FILE
@REDIS_URL
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of keys.")
def keys_list(env_file: Path | None, redis_url: str | None, as_json: bool) -> None:
    """List the keys (never their secrets), oldest first."""
    with _key_store(env_file, redis_url) as store:
        keys = store.list_keys()
    if as_json:
        click.echo(json.dumps([public(key) for key in keys], indent=2))
        return
    console = rich.console.Console()
    if not console.is_terminal:
        console = rich.console.Console(width=TABLE_WIDTH)  # piped: no column cut short
    console.print(_keys_table(keys))


def _keys_table(keys: list[ApiKey]) -> rich.table.Table:
    table = rich.table.Table("id", "name", "scope", "models", "priority", "concurrent", "rpm",
                             "tokens/day", "allow ips", "created")  # fmt: skip
    for key in keys:
        limits = (key.max_concurrent, key.rpm, key.tokens_per_day)
        table.add_row(
            key.id, key.name, key.scope, ",".join(key.models) or "*", key.priority,
            *("-" if n is None else str(n) for n in limits), ",".join(key.allow_ips) or "any",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created)),
        )  # fmt: skip
    return table


@keys_group.command("revoke")
@ENV_FILE
@REDIS_URL
@click.argument("key")
def keys_revoke(env_file: Path | None, redis_url: str | None, key: str) -> None:
    """Revoke KEY (its id, or its name if no other key has it): at once on every replica."""
    with _key_store(env_file, redis_url) as store:
        revoked = store.revoke(key)
    click.echo(f"Revoked key {revoked.id} ({revoked.name!r}).")


@keys_group.command("update")
@ENV_FILE
@REDIS_URL
@click.argument("key")
@_key_options
@click.pass_context
def keys_update(
    ctx: click.Context, env_file: Path | None, redis_url: str | None, key: str, **values: Any
) -> None:
    """Change the given fields of KEY (its id, or its name if no other key has it)."""
    given = _given(values, ctx)
    if not given:
        raise click.UsageError("nothing to change: give at least one option")
    with _key_store(env_file, redis_url) as store:
        updated = store.update(key, given)
    click.echo(f"Updated key {updated.id} ({updated.name!r}).")


@main.command("usage")
@ENV_FILE
@REDIS_URL
@click.option(
    "--key",
    "key_ref",
    help="Only this key (its id or name; a revoked key's id; '' for requests without a key).",
)
@click.option(
    "--days",
    type=click.IntRange(1, usage.MAX_DAYS),
    default=1,
    show_default=True,
    help="The last N UTC days, today included.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of rows.")
def usage_command(
    env_file: Path | None, redis_url: str | None, key_ref: str | None, days: int, as_json: bool
) -> None:
    """Requests, prompt tokens and completion tokens per key, model and UTC day, counted by
    the API from Ollama's answers (docs/limits.md); requests without a key show as
    "(no key)". Read from the Redis of start-api (--env-file and the environment)."""
    with _key_store(env_file, redis_url) as store:
        names = {key.id: key.name for key in store.list_keys()}
        settings: ApiSettings = _settings(ApiSettings, env_file, celery_broker_url=redis_url)
        key_id = _key_id(names, key_ref)
        rows = asyncio.run(_read_usage(settings.redis, usage.days(days), key_id))
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    console = rich.console.Console()
    if not console.is_terminal:
        console = rich.console.Console(width=TABLE_WIDTH)
    table = rich.table.Table("day", "key", "name", "model", "requests", "prompt tokens",
                             "completion tokens")  # fmt: skip
    for row in rows:
        table.add_row(
            row.day, row.key or usage.NO_KEY, names.get(row.key, "-"), row.model,
            str(row.requests), str(row.prompt), str(row.completion),
        )  # fmt: skip
    console.print(table)


def _key_id(names: dict[str, str], ref: str | None) -> str | None:
    """The key id ``ref`` names: an id, a name only one key has, or else ``ref`` itself (a
    revoked key's id)."""
    if ref is None or ref in names:
        return ref
    ids = [key_id for key_id, name in names.items() if name == ref]
    return ids[0] if len(ids) == 1 else ref


async def _read_usage(url: str, when: list[str], key_id: str | None) -> list[usage.Row]:
    client = async_redis(url, socket_connect_timeout=5)
    try:
        return await usage.read(client, when, key_id)
    finally:
        await client.aclose()


@main.command("worker-acl")
@ENV_FILE
@REDIS_URL
@click.option("--user", required=True, help="Name of the Redis user for workers, e.g. worker.")
@click.option(
    "--password", help="Its password (default: a random one, shown in the URL on stderr)."
)
@click.option(
    "--worker-id",
    help="Bind the user to this one worker (its WORKER_ID): of the workers' registry entries "
    "and queues it may touch only its own. Default: a user every worker may share.",
)
@click.option(
    "--aclfile",
    is_flag=True,
    help="Print a line for a Redis ACL file instead of an ACL SETUSER command.",
)
def worker_acl(
    env_file: Path | None,
    redis_url: str | None,
    user: str,
    password: str | None,
    worker_id: str | None,
    aclfile: bool,
) -> None:
    """Print the least-privilege Redis user of a worker (docs/redis-acl.md).

    It may take jobs of every model, answer them, register and read the tenants; it may
    not push a job, read the API keys, usage or limits, pattern-subscribe, list keys or
    channels, or run admin commands (FLUSHALL, CONFIG...). Redis 6.2 or later. Run the
    printed command as an admin (redis-cli ... ACL SETUSER ...; then ACL SAVE with an
    aclfile), or add the --aclfile line to the file; give the worker the URL printed on
    stderr as CELERY_BROKER_URL: the configured one (a sentinel:// URL keeps its sentinels
    and master) with the user's credentials, or redis://...@HOST:6379/0 if none is set.
    """
    settings: CommonSettings = _settings(CommonSettings, env_file, celery_broker_url=redis_url)
    secret = password or secrets.token_urlsafe(24)
    try:
        args = setuser_command(user, secret, worker_id)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    url = settings.celery_broker_url if "celery_broker_url" in settings.model_fields_set else None
    click.echo(f"# worker: CELERY_BROKER_URL={_worker_url(url, user, secret)}", err=True)
    click.echo(aclfile_line(user, secret, worker_id) if aclfile else " ".join(map(quote, args)))


def _worker_url(url: str | None, user: str, secret: str) -> str:
    """``url`` (``redis://``, ``rediss://``, ``unix://`` or ``sentinel://``) with ``user``
    and ``secret`` (percent-encoded) as its credentials, everything else kept: a sentinel://
    URL's sentinels, database, ``master`` and the sentinels' own credentials. Without a
    ``url``: ``redis://user:secret@HOST:6379/0``, to fill in."""
    auth = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(secret, safe='')}"
    scheme, _, rest = (url or "redis://HOST:6379/0").partition("://")
    address, question, query = rest.partition("?")
    netloc, slash, path = address.partition("/")
    return f"{scheme}://{auth}@{netloc.rpartition('@')[2]}{slash}{path}{question}{query}"


main.add_command(remote.status)
main.add_command(remote.pull)
