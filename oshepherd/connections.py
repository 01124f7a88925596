"""Redis clients as every component makes them.

* Retried once Redis is back: without an explicit retry policy the first command on a
  pooled connection that Redis closed (a restart, a failover) fails, though Redis is up.
* A blocking pool: redis-py's default pool refuses the 101st concurrent command ("Too many
  connections"); a gateway holding a thousand streams must queue for a connection instead.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

__all__ = ["async_redis"]

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
