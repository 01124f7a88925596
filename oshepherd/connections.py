"""Redis clients as every component makes them.

* Retried once Redis is back: without an explicit retry policy the first command on a
  pooled connection that Redis closed (a restart, a failover) fails, though Redis is up.
  A command that times out (a hung Redis) fails at once, after one socket timeout.
* A blocking pool: redis-py's default pool refuses the 101st concurrent command ("Too many
  connections"); a gateway holding a thousand streams must queue for a connection instead.
* redis-py (8.1) can lose a task's cancellation that lands while a command runs (seen as
  it connects): code that goes on to wait after a command checks ``raise_if_cancelling``.
* A ``sentinel://`` URL (``config.SentinelUrl``) gives a client of the primary its
  sentinels name: each new connection asks them where the primary is, and a connection
  to a primary that was demoted fails (``READONLY``), so a reconnect after a failover
  reaches the new one (docs/redis-ha.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.sentinel
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError

from oshepherd.config import SentinelUrl, sentinel_url

__all__ = ["async_redis", "raise_if_cancelling", "sync_redis"]

MAX_CONNECTIONS = 64
POOL_TIMEOUT = 10.0  # seconds a command may wait for a free connection


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool of connections to the primary, waiting for a free connection (as
    ``BlockingConnectionPool``) rather than refusing one past ``max_connections``."""


def async_redis(url: str, **options: Any) -> Redis:
    """A client of the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://`` or
    ``sentinel://``); ``options`` are redis-py's connection options."""
    common: dict[str, Any] = {
        "max_connections": MAX_CONNECTIONS,
        "timeout": POOL_TIMEOUT,
        # A closed connection is retried; a timeout is not: a Redis that hangs (stopped, a
        # full disk) would hold every request for three socket timeouts instead of one.
        "retry": Retry(
            ExponentialBackoff(cap=0.5, base=0.05), retries=2, supported_errors=(ConnectionError,)
        ),
        "health_check_interval": 10,
        **options,
    }
    target = sentinel_url(url)
    if target is None:
        return Redis(connection_pool=BlockingConnectionPool.from_url(url, **common))
    sentinels = Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options))
    client: Redis = sentinels.master_for(
        target.master,
        redis_class=Redis,
        connection_pool_class=_BlockingSentinelPool,
        **target.master_kwargs,
        **common,
    )
    return client


def sync_redis(url: str, **options: Any) -> redis.Redis:
    """A blocking client of the Redis at ``url`` (as ``async_redis``), for the CLI and the
    API's threads; a sentinel-managed one asks its sentinels for the primary."""
    target = sentinel_url(url)
    if target is None:
        return redis.Redis.from_url(url, **options)
    sentinels = redis.sentinel.Sentinel(
        target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options)
    )
    client: redis.Redis = sentinels.master_for(target.master, **target.master_kwargs, **options)
    return client


def _sentinel_kwargs(target: SentinelUrl, options: dict[str, Any]) -> dict[str, Any]:
    """The sentinels' credentials, and the socket timeouts the primary's connections have
    (redis-py's default when it is given no ``sentinel_kwargs``)."""
    sockets = {k: v for k, v in options.items() if k.startswith("socket_")}
    return {**sockets, **target.sentinel_kwargs}


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was cancelled during a Redis command
    that swallowed the cancellation (redis-py 8.1), instead of going on to wait."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
