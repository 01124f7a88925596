"""Redis clients as every component makes them.

* Retried once Redis is back: without an explicit retry policy the first command on a
  pooled connection that Redis closed (a restart, a failover) fails, though Redis is up.
* A blocking pool: redis-py's default pool refuses the 101st concurrent command ("Too many
  connections"); a gateway holding a thousand streams must queue for a connection instead.
* redis-py (8.1) can lose a task's cancellation that lands while a command runs (seen as
  it connects): code that goes on to wait after a command checks ``raise_if_cancelling``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

__all__ = ["async_redis", "raise_if_cancelling"]

MAX_CONNECTIONS = 64
POOL_TIMEOUT = 10.0  # seconds a command may wait for a free connection


def async_redis(url: str, **options: Any) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=10,
        **options,
    )
    return Redis(connection_pool=pool)


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task was cancelled during a Redis command
    that swallowed the cancellation (redis-py 8.1), instead of going on to wait."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
