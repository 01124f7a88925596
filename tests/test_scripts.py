"""The wire's Lua scripts on a real Redis: a worker's start and the API's giving up on a
lost attempt are atomic with each other, so an attempt runs, or its re-run does, never both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from oshepherd.protocol import (
    CANCEL_ALL,
    START_SCRIPT,
    SUPERSEDE_SCRIPT,
    cancel_key,
    started_key,
)
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import fresh_database

pytestmark = pytest.mark.slow

QUEUE = "oshepherd.model.m:latest"
CHANNEL = "oshepherd:job:api:j1"


@pytest.fixture
def client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(fresh_database(redis_server)) as client:
        yield client


def start(client: redis.Redis, attempt: int) -> int:
    keys = [cancel_key("j1"), started_key("j1")]
    return int(client.eval(START_SCRIPT, 2, *keys, CHANNEL, b"start", attempt))


def supersede(client: redis.Redis, message: bytes, attempt: int) -> int:
    keys = [QUEUE, cancel_key("j1"), started_key("j1")]
    return int(client.eval(SUPERSEDE_SCRIPT, 3, *keys, message, attempt))


def test_an_attempt_still_queued_is_not_given_up(client: redis.Redis) -> None:
    client.lpush(QUEUE, b"message")
    assert supersede(client, b"message", 0) == 0
    assert client.get(cancel_key("j1")) is None


def test_an_attempt_that_started_first_is_followed_not_given_up(client: redis.Redis) -> None:
    assert start(client, 0) == 1  # taken off the queue and started
    assert supersede(client, b"message", 0) == 0
    assert client.get(cancel_key("j1")) is None
    assert 0 < client.ttl(started_key("j1")) <= 60


def test_an_attempt_given_up_first_never_starts_and_its_rerun_does(client: redis.Redis) -> None:
    assert supersede(client, b"message", 0) == 1  # taken off the queue, not started
    assert start(client, 0) == 0  # the worker that took it comes back: refused
    assert start(client, 1) == 1  # the re-run
    assert supersede(client, b"message", 1) == 0


def test_giving_up_never_lowers_a_cancel(client: redis.Redis) -> None:
    client.set(cancel_key("j1"), CANCEL_ALL)
    assert supersede(client, b"message", 0) == 1
    assert int(client.get(cancel_key("j1")) or 0) == CANCEL_ALL
    assert start(client, 1) == 0
