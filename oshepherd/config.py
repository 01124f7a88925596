"""Settings of the API and the worker, read from an env file and the environment.

The names of the original oshepherd templates keep working (``HOST``, ``PORT``,
``CELERY_BROKER_URL``, ``CELERY_BACKEND_URL``, ``OLLAMA_BASE_URL``, ``CONCURRENCY``,
``LOGLEVEL``). Settings objects are built explicitly by the CLI or the tests, never at
import time.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import AliasChoices, AliasPath, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from oshepherd.keys import parse_networks
from oshepherd.logs import LogFormat

__all__ = [
    "ApiSettings",
    "CommonSettings",
    "SentinelUrl",
    "WorkerSettings",
    "env_names",
    "load",
    "redacted",
    "sentinel_url",
]

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
MiB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # logging's, as LOGLEVEL takes them
# kombu's Redis visibility timeout: an unacked message is handed out again after it.
VISIBILITY_TIMEOUT = 3600.0

S = TypeVar("S", bound="CommonSettings")


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    celery_broker_url: str = DEFAULT_REDIS
    celery_backend_url: str | None = None
    redis_url: str | None = Field(
        default=None, description="Pub/Sub and registry; defaults to CELERY_BROKER_URL"
    )
    loglevel: str = "INFO"
    log_format: LogFormat = Field(default="text", description="text or json (LOG_FORMAT)")

    @field_validator("celery_broker_url", "redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ValueError("must be a redis://, rediss://, unix:// or sentinel:// URL")
        sentinel_url(value)  # a sentinel:// URL's errors, at start-up
        return value

    @field_validator("loglevel")
    @classmethod
    def _upper(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @property
    def redis(self) -> str:
        return self.redis_url or self.celery_broker_url


class ApiSettings(CommonSettings):
    """The HTTP front end (``oshepherd start-api``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=5001, ge=0, le=65535)
    # Unset, a queued job waits as long as its client does, as in Ollama (no time limit);
    # a client that hangs up withdraws it at once.
    queue_timeout: float | None = Field(
        default=None, gt=0, lt=VISIBILITY_TIMEOUT, description="latest start of a job (s)"
    )
    stall_timeout: float = Field(default=60.0, gt=0, description="silence that ends a job (s)")
    max_queue_depth: int = Field(
        default=512, ge=1, description="jobs waiting per model, tenant and priority"
    )
    # Fits a vision chat whose history holds sixteen 3 MiB photos (base64: 4 MiB each); ten
    # are a 40 MiB body. A body is held whole, and measured per in-flight request of N bytes:
    # the API holds 2N while the job waits or runs (its text, and the queued message kept to
    # withdraw it), 5N at its peak while reading and queueing it; Redis holds N while it is
    # queued (4N at the peak of the enqueue); the worker 6N while it runs (7N at its peak).
    # The most, 128 MiB: the message escapes the body's JSON twice (4x at worst, a body of
    # quotes), which brings it to Redis's proto-max-bulk-len (512 MB by default).
    max_body_bytes: int = Field(default=64 * MiB, ge=1024, le=128 * MiB)
    registry_refresh: float = Field(default=1.0, gt=0)
    shutdown_grace: float = Field(default=30.0, ge=0)
    ollama_origins: str = Field(default="", description="extra CORS origins, comma-separated")
    embed_batch_size: int = Field(default=256, ge=1)
    # A request's concurrency lease (docs/limits.md) expires this long after its API process
    # last renewed it (every third of it): how long a crashed API's requests still count.
    lease_ttl: float = Field(default=30.0, ge=0.3, le=3600, description="lease expiry (s)")
    # Client addresses: a global allowlist, and the proxies whose X-Forwarded-For is believed
    # (uvicorn's forwarded_allow_ips; none by default, so no client can spoof its address).
    allow_ips: str = Field(default="", description="CIDRs that may call, comma-separated")
    trusted_proxies: str = Field(default="", description="CIDRs of trusted proxies")
    # Prometheus (docs/metrics.md): per-request metrics on or off; the bearer token that may
    # scrape /metrics and /metrics/fleet once API keys exist (besides an admin key).
    metrics: bool = Field(default=True, description="count requests for /metrics")
    metrics_token: str = Field(default="", description="bearer token of /metrics scrapes")
    # API processes on the one port (start-api --workers; docs/operations.md): each its own
    # event loop, Pub/Sub connection and view of the fleet. Not the fleet's workers.
    api_processes: int = Field(default=1, ge=1, le=256, description="API processes (cores)")

    @field_validator("queue_timeout", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``QUEUE_TIMEOUT=`` (as a template leaves it) means no limit, like no setting."""
        return None if value == "" else value

    @field_validator("allow_ips", "trusted_proxies")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        """Comma-separated CIDRs (an address alone is its /32 or /128), normalized."""
        return ",".join(parse_networks(value, "CIDRs"))


class WorkerSettings(CommonSettings):
    """A worker beside one Ollama host (``oshepherd start-worker``)."""

    ollama_base_url: str = "http://127.0.0.1:11434"
    concurrency: int = Field(default=1, ge=1, le=256, description="slots: jobs run at once")
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    heartbeat_interval: float = Field(default=2.0, gt=0)
    ping_interval: float = Field(default=5.0, gt=0)
    shutdown_timeout: float = Field(default=60.0, ge=0, description="finish in-flight jobs (s)")
    # A host that would have to load a model first leaves its jobs this long to hosts that
    # have it loaded (docs/scheduling.md).
    warm_wait: float = Field(
        default=0.3, ge=0, le=60, description="wait for a warm host before loading (s)"
    )

    @field_validator("ollama_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _worker_id(self) -> Self:
        if self.worker_id.strip() != self.worker_id or not self.worker_id:
            raise ValueError("WORKER_ID must be non-empty and without surrounding spaces")
        return self

    @property
    def registry_ttl(self) -> float:
        """A worker that missed three heartbeats vanishes from the registry by itself."""
        return self.heartbeat_interval * 3


def load(cls: type[S], env_file: Path | None, **overrides: Any) -> S:
    """Settings from ``env_file`` and the environment; non-None ``overrides`` win."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return cls(_env_file=env_file, **given)  # type: ignore[call-arg]


def env_names(*models: type[BaseSettings]) -> frozenset[str]:
    """Every environment variable name that ``models`` read, upper-case (``QUEUE_TIMEOUT``,
    ``CELERY_BROKER_URL``...); by default those of ``ApiSettings`` and ``WorkerSettings``.

    Derived from the models' fields, so a field added to a model is in it at once. A field
    is read as ``env_prefix`` + its name, or, when it has a validation alias, by the alias
    alone (the head of an ``AliasPath``), as pydantic-settings does. Upper-case is the one
    spelling because the settings ignore case (``case_sensitive=False``).
    """
    return frozenset(
        name.upper()
        for model in models or (ApiSettings, WorkerSettings)
        for field_name, field in model.model_fields.items()
        for name in _field_env_names(model.model_config.get("env_prefix", ""), field_name, field)
    )


def _field_env_names(prefix: str, name: str, field: FieldInfo) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasPath):
        return [str(alias.path[0])]
    if isinstance(alias, AliasChoices):
        return [c if isinstance(c, str) else str(c.path[0]) for c in alias.choices]
    return [prefix + name]


DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """A Redis managed by Sentinel, as one URL (docs/redis-ha.md)::

        sentinel://[user:password@]host[:port],host[:port],.../db?master=NAME
            [&sentinel_username=USER][&sentinel_password=PASSWORD]

    ``user:password`` authenticates to the Redis servers (primary and replicas), the
    ``sentinel_*`` parameters to the sentinels (none by default, as Sentinel's
    ``requirepass`` is its own); ports default to 26379, the database to 0.
    """

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Raises ``ValueError`` naming what is wrong."""
        scheme, _, rest = url.partition("://")
        if scheme != "sentinel":
            raise ValueError("a Sentinel URL starts with sentinel://")
        rest, _, query = rest.partition("?")
        rest, _, path = rest.partition("/")
        userinfo, _, hosts = rest.rpartition("@")
        user, _, password = userinfo.partition(":")
        params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False))
        unknown = set(params) - {"master", "sentinel_username", "sentinel_password"}
        if unknown:
            raise ValueError(f"unknown sentinel:// parameter(s): {', '.join(sorted(unknown))}")
        if not params.get("master"):
            raise ValueError("a sentinel:// URL needs ?master=NAME (the monitored master)")
        if not path.strip("/").isdigit() and path.strip("/"):
            raise ValueError(f"the database of a sentinel:// URL is a number, not {path!r}")
        unquote = urllib.parse.unquote
        return cls(
            sentinels=tuple(_host_port(item) for item in hosts.split(",")),
            master=params["master"],
            db=int(path.strip("/") or 0),
            username=unquote(user) or None,
            password=unquote(password) or None,
            sentinel_username=params.get("sentinel_username") or None,
            sentinel_password=params.get("sentinel_password") or None,
        )

    @property
    def sentinel_kwargs(self) -> dict[str, Any]:
        """redis-py's options for the connections to the sentinels themselves."""
        auth = {"username": self.sentinel_username, "password": self.sentinel_password}
        return {key: value for key, value in auth.items() if value is not None}

    @property
    def master_kwargs(self) -> dict[str, Any]:
        """redis-py's options for the connections to the primary (``master_for``)."""
        auth = {"username": self.username, "password": self.password, "db": self.db}
        return {key: value for key, value in auth.items() if value is not None}

    def kombu_url(self) -> str:
        """kombu's form: ``sentinel://[user:password@]host:port/db;sentinel://host:port/db``
        (kombu reads the credentials and database of the first)."""
        quote = urllib.parse.quote
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(
            f"sentinel://{auth if i == 0 else ''}{_netloc(host)}:{port}/{self.db}"
            for i, (host, port) in enumerate(self.sentinels)
        )

    def kombu_options(self) -> dict[str, Any]:
        """kombu's transport options naming the master and the sentinels' credentials."""
        options: dict[str, Any] = {"master_name": self.master}
        if self.sentinel_kwargs:
            options["sentinel_kwargs"] = self.sentinel_kwargs
        return options


def sentinel_url(url: str) -> SentinelUrl | None:
    """``url`` parsed if it is a ``sentinel://`` URL, else None; raises ``ValueError``."""
    return SentinelUrl.parse(url) if url.startswith("sentinel://") else None


def _host_port(item: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(f"//{item.strip()}")
    try:
        port = parts.port or DEFAULT_SENTINEL_PORT
    except ValueError as exc:
        raise ValueError(f"bad sentinel address {item!r}: {exc}") from exc
    if not parts.hostname:
        raise ValueError(f"bad sentinel address {item!r}: no host")
    return parts.hostname, port


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redacted(url: str) -> str:
    """A URL without its passwords (a sentinel:// URL's ``sentinel_password`` too), for logs."""
    url = re.sub(r"(sentinel_password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"
