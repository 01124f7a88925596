"""Redis clients as every component makes them: retried once Redis is back.

Without an explicit retry policy the first command on a pooled connection that Redis
closed (a restart, a failover) fails, even though Redis is up again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

__all__ = ["async_redis"]


def async_redis(url: str, **options: Any) -> Redis:
    return Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=10,
        **options,
    )
