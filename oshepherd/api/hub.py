"""One Pub/Sub connection per API process, multiplexing the frames of every in-flight job.

The process subscribes once, to the pattern of its own job channels, so a request costs no
SUBSCRIBE/UNSUBSCRIBE round trips and leaves no subscription behind. Frames go to the
job's ``asyncio.Queue``; when the connection drops, every open job is told (``LOST``)
and the hub reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.protocol import job_channel, job_channel_pattern, job_id_from_channel

__all__ = ["LOST", "Hub"]

log = logging.getLogger(__name__)

LOST: Final = b""  # in a job's queue: the Pub/Sub connection dropped, frames may be lost


class Hub:
    def __init__(self, redis: Redis, api_id: str) -> None:
        self._redis = redis
        self._api_id = api_id
        self._queues: dict[str, asyncio.Queue[bytes]] = {}
        self._ready = asyncio.Event()

    def channel(self, job_id: str) -> str:
        return job_channel(self._api_id, job_id)

    def open(self, job_id: str) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues[job_id] = queue
        return queue

    def close(self, job_id: str) -> None:
        self._queues.pop(job_id, None)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def run_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                log.warning("Pub/Sub connection lost, reconnecting: %r", exc)
            if self._ready.is_set():
                backoff = 0.1
            self._ready.clear()
            for queue in self._queues.values():
                queue.put_nowait(LOST)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.psubscribe(job_channel_pattern(self._api_id))
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                if message["type"] == "psubscribe":
                    self._ready.set()
                elif message["type"] == "pmessage":
                    queue = self._queues.get(job_id_from_channel(message["channel"].decode()))
                    if queue is not None:
                        queue.put_nowait(message["data"])
