"""The API's Pub/Sub connection (``Inboxes``) on a real redis-server that goes away and
comes back: the open inboxes are told, the process subscribes again within one retry
interval of Redis's return, retries at a steady cadence meanwhile (no busy loop), and logs
one warning for the outage and one info line when back."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from oshepherd.api import inbox
from oshepherd.api.inbox import LOST, RETRY_EVERY, Inboxes
from oshepherd.connections import async_redis
from oshepherd.redis_server import EmbeddedRedis
from tests.conftest import until

pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.timeout(30)]

ATTEMPTS_AWAY = 4  # failed attempts to subscribe before Redis comes back


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == inbox.__name__ and r.levelno == level]


async def test_the_pubsub_comes_back_promptly_and_logs_the_outage_once(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=inbox.__name__)
    redis = async_redis(server.url, socket_connect_timeout=0.5)
    inboxes = Inboxes(redis, "api")
    task = asyncio.create_task(inboxes.run_forever())
    try:
        assert await inboxes.wait_ready(5)
        job = inboxes.open("j1")
        server.stop()
        assert await job.get(5) == LOST
        assert not inboxes.is_ready
        away = time.monotonic()

        def attempts() -> int:
            return len(_records(caplog, logging.DEBUG))

        await until(lambda: attempts() >= ATTEMPTS_AWAY, 10, f"{ATTEMPTS_AWAY} attempts")
        # A steady cadence, not a busy loop: the first attempt after the drop, then one
        # every RETRY_EVERY s.
        assert attempts() <= (time.monotonic() - away) / RETRY_EVERY + 1
        server.start()
        back = time.monotonic()
        assert await inboxes.wait_ready(5)
        assert time.monotonic() - back < RETRY_EVERY + 0.5
        assert await job.get(0.05) is None  # told once, not at every attempt
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()
    warnings, infos = _records(caplog, logging.WARNING), _records(caplog, logging.INFO)
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("Pub/Sub connection away")
    assert len(infos) == 1 and infos[0].getMessage().startswith("Pub/Sub connection back after")
