"""Where a job's frames arrive: one Pub/Sub connection per API process, an ``Inbox`` per job.

The process subscribes once, to the pattern of its own job channels, so a request costs no
SUBSCRIBE/UNSUBSCRIBE round trips and leaves no subscription behind. Each raw frame goes
to its job's inbox; when the connection drops, every open inbox is told (``LOST``) and
``Inboxes`` reconnects by itself, as promptly as the workers do after a Sentinel failover
(every 0.25 s for the first 10 s of an outage). This is the API's end of the worker's
``Outbox``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.protocol import job_channel, job_channel_pattern, job_id_from_channel

__all__ = ["LOST", "Inbox", "Inboxes"]

log = logging.getLogger(__name__)

LOST: Final = b""  # in an inbox: the Pub/Sub connection dropped, frames may have been lost
# Seconds between attempts to subscribe again: RETRY_EVERY for the first RETRY_FAST_FOR
# seconds of an outage (a Sentinel failover promotes a replica within seconds; the workers
# look for it as often, worker.transport), then RETRY_SLOW.
RETRY_EVERY: Final = 0.25
RETRY_FAST_FOR: Final = 10.0
RETRY_SLOW: Final = 2.0


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
        self._down_since: float | None = None  # monotonic start of the outage, if one

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
        """Subscribe and deliver frames until cancelled. After a drop, every open inbox gets
        ``LOST`` and the process subscribes again: every ``RETRY_EVERY`` s for the first
        ``RETRY_FAST_FOR`` s of the outage, then every ``RETRY_SLOW`` s. Logs one warning per
        outage and one info line when subscribed again."""
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                self._failed(exc)
            await asyncio.sleep(self._retry_delay())

    def _failed(self, exc: Exception) -> None:
        """The connection dropped, or an attempt to subscribe failed."""
        if self._ready.is_set():
            self._ready.clear()
            for inbox in self._open.values():
                inbox.put(LOST)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("Pub/Sub connection away, reconnecting: %r", exc)
        else:
            log.debug("Pub/Sub still away: %r", exc)

    def _retry_delay(self) -> float:
        """Seconds until the next attempt, from how long the outage has lasted."""
        down = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        return RETRY_EVERY if down < RETRY_FAST_FOR else RETRY_SLOW

    def _subscribed(self) -> None:
        self._ready.set()
        if self._down_since is not None:
            away = time.monotonic() - self._down_since
            self._down_since = None
            log.info("Pub/Sub connection back after %.2f s", away)

    async def _listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.psubscribe(job_channel_pattern(self._api_id))
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                if message["type"] == "psubscribe":
                    self._subscribed()
                elif message["type"] == "pmessage":
                    inbox = self._open.get(job_id_from_channel(message["channel"].decode()))
                    if inbox is not None:
                        inbox.put(message["data"])
