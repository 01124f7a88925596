"""Where a job's frames arrive: one Pub/Sub connection per API process, an ``Inbox`` per job.

The process subscribes once, to the pattern of its own job channels, so a request costs no
SUBSCRIBE/UNSUBSCRIBE round trips and leaves no subscription behind. Each raw frame goes
to its job's inbox; when the connection drops, every open inbox is told (``LOST``) and
``Inboxes`` reconnects by itself. This is the API's end of the worker's ``Outbox``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.protocol import job_channel, job_channel_pattern, job_id_from_channel

__all__ = ["LOST", "Inbox", "Inboxes"]

log = logging.getLogger(__name__)

LOST: Final = b""  # in an inbox: the Pub/Sub connection dropped, frames may have been lost


class Inbox:
    """The raw frames of one job, in the order Redis delivered them."""

    __slots__ = ("_inboxes", "_queue", "job_id")

    def __init__(self, inboxes: Inboxes, job_id: str) -> None:
        self._inboxes = inboxes
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.job_id = job_id

    def put(self, raw: bytes) -> None:
        self._queue.put_nowait(raw)

    async def get(self, timeout: float) -> bytes | None:
        """The next raw frame (``LOST`` when frames may have been lost), or None after
        ``timeout`` seconds without one."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        """Stop delivering to this inbox; frames that still come are dropped."""
        self._inboxes.discard(self.job_id)


class Inboxes:
    """The process's Pub/Sub connection, and the inbox of every job in flight."""

    def __init__(self, redis: Redis, api_id: str) -> None:
        self._redis = redis
        self._api_id = api_id
        self._open: dict[str, Inbox] = {}
        self._ready = asyncio.Event()

    def channel(self, job_id: str) -> str:
        """The reply channel a worker publishes ``job_id``'s frames on."""
        return job_channel(self._api_id, job_id)

    def open(self, job_id: str) -> Inbox:
        inbox = Inbox(self, job_id)
        self._open[job_id] = inbox
        return inbox

    def discard(self, job_id: str) -> None:
        self._open.pop(job_id, None)

    @property
    def is_ready(self) -> bool:
        """Subscribed: a frame published now will arrive."""
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
            for inbox in self._open.values():
                inbox.put(LOST)
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
                    inbox = self._open.get(job_id_from_channel(message["channel"].decode()))
                    if inbox is not None:
                        inbox.put(message["data"])
