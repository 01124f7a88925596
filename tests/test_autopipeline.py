"""The API's auto-pipelining (api.autopipeline.AutoPipeline) against a real redis-server: the
commands of one loop turn share one connection and keep their own replies and errors, a
lost script is loaded again, and a Redis that is away fails every caller of the batch."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from oshepherd.api.autopipeline import AutoPipeline
from oshepherd.connections import async_redis
from oshepherd.redis_server import EmbeddedRedis

pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.timeout(20)]

KEY = "test-autopipeline"


async def test_one_turns_commands_share_one_connection(redis_server: EmbeddedRedis) -> None:
    client = async_redis(redis_server.url)
    try:
        await client.delete(KEY)
        pipeline = AutoPipeline(client)
        replies = await asyncio.gather(*(pipeline.execute("RPUSH", KEY, i) for i in range(200)))
        assert sorted(replies) == list(range(1, 201))  # each its own reply
        assert await client.lrange(KEY, 0, -1) == [str(i).encode() for i in range(200)]
        pool = client.connection_pool
        assert len(pool._available_connections) == 1  # not 200 at once: one pipeline
    finally:
        await client.delete(KEY)
        await client.aclose()


async def test_an_error_reply_is_its_commands_alone(redis_server: EmbeddedRedis) -> None:
    client = async_redis(redis_server.url)
    try:
        await client.set(KEY, "a string")
        pipeline = AutoPipeline(client)
        results = await asyncio.gather(
            pipeline.execute("ECHO", "before"),
            pipeline.execute("LPUSH", KEY, "x"),  # WRONGTYPE
            pipeline.execute("ECHO", "after"),
            return_exceptions=True,
        )
        assert results[0] == b"before" and results[2] == b"after"
        assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    finally:
        await client.delete(KEY)
        await client.aclose()


async def test_a_script_redis_lost_is_loaded_again(redis_server: EmbeddedRedis) -> None:
    client = async_redis(redis_server.url)
    try:
        script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        await client.delete(KEY)
        pipeline = AutoPipeline(client)
        await client.script_flush()  # as a restart or a failover would
        runs = [pipeline.run_script(script, [KEY], [n]) for n in (1, 2, 3)]
        assert max(await asyncio.gather(*runs)) == 6
        assert await client.get(KEY) == b"6"  # each ran exactly once: 1 + 2 + 3
    finally:
        await client.delete(KEY)
        await client.aclose()


async def test_every_caller_hears_that_redis_is_away() -> None:
    with EmbeddedRedis() as server:
        client: Redis = async_redis(server.url, socket_connect_timeout=1)
        pipeline = AutoPipeline(client)
        assert await pipeline.execute("PING")
    try:
        results = await asyncio.gather(
            *(pipeline.execute("ECHO", i) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ConnectionError) for r in results), results
        solo = await asyncio.gather(pipeline.execute("PING"), return_exceptions=True)
        assert isinstance(solo[0], ConnectionError)
    finally:
        await client.aclose()
