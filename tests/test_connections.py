"""The API's Redis pool (connections.LeanBlockingPool) against a real redis-server: commands
past max_connections wait their turn instead of failing, a wait has its timeout, a cancelled
waiter gives its place up, and a connection Redis closed is reopened."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, TimeoutError

from oshepherd.connections import LeanBlockingPool, async_redis
from oshepherd.redis_server import EmbeddedRedis
from tests.conftest import until

pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.timeout(20)]


async def _block(client: Redis, seconds: float) -> object:
    """Hold one connection for ``seconds`` (a BLPOP on a list nobody pushes to)."""
    return await client.blpop(["test-connections-nothing"], timeout=seconds)


def _busy(client: Redis) -> bool:
    """Whether every connection of ``client``'s pool is in use."""
    pool = client.connection_pool
    return not pool._available_connections and bool(pool._in_use_connections)


def _waiting(client: Redis) -> bool:
    """Whether a command waits its turn for a connection of ``client``'s pool."""
    pool = client.connection_pool
    assert isinstance(pool, LeanBlockingPool)
    return bool(pool._turns)


async def _ping(client: Redis) -> bool:
    return bool(await client.ping())


def _client(server: EmbeddedRedis, connections: int, timeout: float) -> Redis:
    pool = LeanBlockingPool.from_url(server.url, max_connections=connections, timeout=timeout)
    return Redis(connection_pool=pool)


async def test_a_thousand_commands_share_four_connections(redis_server: EmbeddedRedis) -> None:
    client = _client(redis_server, connections=4, timeout=10)
    try:
        results = await asyncio.gather(*(client.echo(str(i)) for i in range(1000)))
        assert results == [str(i).encode() for i in range(1000)]
        pool = client.connection_pool
        assert len(pool._available_connections) == 4 and not pool._in_use_connections
    finally:
        await client.aclose()


async def test_a_wait_past_its_timeout_is_no_connection(redis_server: EmbeddedRedis) -> None:
    client = _client(redis_server, connections=1, timeout=0.2)
    try:
        blocked = asyncio.create_task(_block(client, 2))
        await until(lambda: _busy(client), 5, "the BLPOP holds the one connection")
        with pytest.raises(ConnectionError, match="No connection available"):
            await client.ping()
        assert await blocked is None  # then the queue moves on
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_cancelled_waiter_gives_its_turn_up(redis_server: EmbeddedRedis) -> None:
    client = _client(redis_server, connections=1, timeout=5)
    try:
        blocked = asyncio.create_task(_block(client, 0.3))
        await until(lambda: _busy(client), 5, "the BLPOP holds the one connection")
        waiter = asyncio.create_task(_ping(client))
        await until(lambda: _waiting(client), 5, "the PING waits its turn")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await blocked is None
        assert await asyncio.wait_for(client.ping(), 2)  # no dead turn ahead of it
    finally:
        await client.aclose()


async def test_a_connection_redis_closed_is_reopened(redis_server: EmbeddedRedis) -> None:
    client = async_redis(redis_server.url)
    try:
        await client.client_setname("test-connections")
        await client.execute_command("CLIENT", "KILL", "SKIPME", "no", "TYPE", "normal")
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_write_redis_never_takes_times_out_and_drops_the_connection() -> None:
    """A hung Redis (stopped) stops reading: a large write fills the socket and must fail
    after the socket timeout with redis-py's TimeoutError, as without the write-in-task."""
    with EmbeddedRedis() as server:
        client = async_redis(server.url, socket_timeout=0.5)
        try:
            assert await client.ping()
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError, match="writing to socket"):
                    await client.set("test-connections-big", b"x" * (64 << 20))
                assert time.monotonic() - started < 5
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await client.ping()  # a new connection, the broken one dropped
        finally:
            await client.aclose()
