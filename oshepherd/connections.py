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
import sys
from collections import deque
from typing import Any

import redis
import redis.sentinel
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError

from oshepherd.config import SentinelUrl, sentinel_url

__all__ = ["LeanBlockingPool", "async_redis", "raise_if_cancelling", "sync_redis"]

MAX_CONNECTIONS = 64
POOL_TIMEOUT = 10.0  # seconds a command may wait for a free connection


class LeanBlockingPool(BlockingConnectionPool):
    """``BlockingConnectionPool``'s semantics at a fraction of its cost per command.

    A command past ``max_connections`` waits up to ``timeout`` seconds for a connection
    (then ``ConnectionError("No connection available.")``), in turn: a released connection
    goes straight to the longest waiter. redis-py's pool takes an ``asyncio.Condition``, a
    timeout, a lock and a reconnect-through-retry check per command (about 50 µs of the
    API's CPU each); here a free connection is taken with none of them, and one that is
    closed or holds unread bytes goes through redis-py's own ``ensure_connection``. While
    redis-py handles a maintenance notification (Redis Enterprise's MOVING, which rewrites
    the pool under its lock) the pool keeps redis-py's path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns: deque[asyncio.Future[AbstractConnection]] = deque()
        if sys.version_info < (3, 12):
            self.connection_class = _writing_in_task(self.connection_class)

    async def get_connection(  # type: ignore[override]
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        if self._in_maintenance:
            connection: AbstractConnection = await super().get_connection()
            return connection
        if self._turns or not self.can_get_connection():
            connection = await self._wait_turn()
        else:
            connection = self.get_available_connection()
        try:
            if not await _ready(connection):
                await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if self._in_maintenance:
            await super().release(connection)
            return
        if connection.should_reconnect():
            await connection.disconnect()
        await connection.re_auth()  # what redis-py's release event does
        self._hand_on(connection)

    def _hand_on(self, connection: AbstractConnection) -> None:
        """Give ``connection`` to the longest waiter, or back to the pool."""
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(connection)
                return
        self._in_use_connections.discard(connection)
        self._available_connections.append(connection)

    async def _wait_turn(self) -> AbstractConnection:
        turn: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
        self._turns.append(turn)
        try:
            async with asyncio.timeout(self.timeout):
                return await turn
        except BaseException as err:
            if turn.done() and not turn.cancelled():
                self._hand_on(turn.result())  # handed over as the wait ended otherwise
            else:
                self._turns.remove(turn)
            if isinstance(err, TimeoutError):
                raise ConnectionError("No connection available.") from err
            raise


class _WriteInTask:
    """A connection that writes a command in the caller's task. redis-py writes under
    ``asyncio.wait_for``, which on Python 3.11 wraps each write in a task of its own (3.12's
    does not): a fifth of a small command's CPU (75 -> 55 us measured). This writes under
    ``asyncio.timeout``, with the same ``socket_timeout`` and the same ``TimeoutError``."""

    socket_timeout: float | None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        self.socket_timeout = None  # redis-py's write without wait_for, for this write
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except TimeoutError as exc:  # asyncio's: redis-py has disconnected, as it would
            raise redis.exceptions.TimeoutError("Timeout writing to socket") from exc
        finally:
            self.socket_timeout = timeout


_WRITING_IN_TASK: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _writing_in_task(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with ``_WriteInTask``'s writes (one class per connection class)."""
    if cls not in _WRITING_IN_TASK:
        _WRITING_IN_TASK[cls] = type(cls.__name__, (_WriteInTask, cls), {})
    return _WRITING_IN_TASK[cls]


async def _ready(connection: AbstractConnection) -> bool:
    """Whether ``connection`` is open with nothing unread (redis-py's own check, without
    its reconnect attempt)."""
    try:
        return connection.is_connected and not await connection.can_read()
    except ConnectionError:
        return False


class _BlockingSentinelPool(SentinelConnectionPool, LeanBlockingPool):
    """Sentinel's pool of connections to the primary, waiting for a free connection (as
    ``BlockingConnectionPool``) rather than refusing one past ``max_connections``; closed
    (with its client), it closes its connections to the sentinels too."""

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


class _SentinelPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's Sentinel pool that, closed (with its client), closes its
    connections to the sentinels too."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.sentinel_manager.close()


def async_redis(url: str, **options: Any) -> Redis:
    """A client of the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://`` or
    ``sentinel://``); ``options`` are redis-py's connection options. Its ``aclose()``
    closes its pool, and a sentinel-managed one's connections to the sentinels."""
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
        return Redis(connection_pool=LeanBlockingPool.from_url(url, **common))
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
    API's threads; a sentinel-managed one asks its sentinels for the primary, and its
    ``close()`` (or leaving its ``with``) closes its connections to them too."""
    target = sentinel_url(url)
    if target is None:
        return redis.Redis.from_url(url, **options)
    sentinels = redis.sentinel.Sentinel(
        target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, options)
    )
    client: redis.Redis = sentinels.master_for(
        target.master, connection_pool_class=_SentinelPool, **target.master_kwargs, **options
    )
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
