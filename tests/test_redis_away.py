"""Redis going away and misses, on a real redis-server: a cancel that Redis refuses (away,
failing over) is retried once Redis answers, so a job queued before the outage does not run
after it (the server is stopped and started again with its queue, from an RDB snapshot
taken before, as a promoted replica would have it); requests for a model nobody has do
not turn into a flood of registry reads."""

from __future__ import annotations

import time

import anyio
import pytest

from oshepherd.api.dispatcher import Dispatcher
from oshepherd.api.inbox import Inboxes
from oshepherd.api.registry import MISS_REFRESH_GAP, Registry
from oshepherd.config import ApiSettings
from oshepherd.connections import async_redis
from oshepherd.protocol import CANCEL_ALL, Job, cancel_key, celery_message, model_queue
from oshepherd.redis_server import EmbeddedRedis

pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_a_cancel_redis_refused_is_retried_once_it_answers(server: EmbeddedRedis) -> None:
    redis = async_redis(server.url, socket_timeout=0.5)
    settings = ApiSettings(celery_broker_url=server.url)  # type: ignore[call-arg]
    dispatcher = Dispatcher(redis, Inboxes(redis, "api"), Registry(redis, refresh=1), settings)
    job = Job("j1", "channel", "POST", "/api/generate", "{}", "m:latest", None,
              queue=model_queue("m:latest"))  # fmt: skip
    message = celery_message(job)
    await redis.lpush(job.key, message)
    await redis.save()  # the queue, as the replica promoted in a failover holds it
    server.stop()
    await dispatcher._cancel(job, message, CANCEL_ALL)  # refused: Redis is gone
    server.start()
    with anyio.fail_after(10):
        while await redis.llen(job.key):
            await anyio.sleep(0.05)
    assert int(await redis.get(cancel_key(job.id)) or 0) == CANCEL_ALL
    await redis.aclose()


async def test_misses_refresh_the_registry_at_most_every_gap(server: EmbeddedRedis) -> None:
    """Requests for a model nobody has, back to back: each waits for a refresh that began
    after it, but refreshes (a read of every worker's entry) start at most every gap."""
    redis = async_redis(server.url)
    registry = Registry(redis, refresh=1)
    started = time.monotonic()
    misses = 0
    while time.monotonic() - started < 1.0:
        asked = time.monotonic()
        await registry.refresh_after(asked)
        assert registry._began > asked  # the view is newer than the miss
        misses += 1
    assert misses <= 1.0 / MISS_REFRESH_GAP + 1
    await redis.aclose()
