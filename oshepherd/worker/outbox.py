"""The one publisher of a job's frames: coalesces what Ollama wrote, pings while it is silent.

The reader (the Ollama response) only appends bytes; a single pump coroutine publishes.
While a publish is in flight, more lines pile up and leave in the next frame, so a fast
stream costs few Redis round trips and a slow one adds no latency. Only complete lines
(NDJSON) or events (SSE) leave; a gap-free ``seq`` lets the API prove nothing was lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis

from oshepherd.protocol import Frame, FrameKind, encode_frame

__all__ = ["Outbox"]

log = logging.getLogger(__name__)


class Outbox:
    def __init__(
        self, redis: Redis, channel: str, attempt: int, *, ping_interval: float, first_seq: int = 1
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._attempt = attempt
        self._ping_interval = ping_interval
        self._seq = first_seq
        self._buffer = bytearray()
        self._separator = b"\n"
        self._head: dict[str, Any] | None = None  # set by start(), cleared once published
        self._head_sent = False
        self._final: Frame | None = None
        self._wake = asyncio.Event()

    # -- the reader's side: synchronous, never waits on Redis --------------------------
    def start(self, status: int, content_type: str) -> None:
        """Ollama answered: the head leaves with the first complete line."""
        if content_type.startswith("text/event-stream"):
            self._separator = b"\n\n"
        self._head = {"status": status, "content_type": content_type}

    def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        self._wake.set()

    def finish(self) -> None:
        """Ollama's response is complete: flush everything, including a partial last line."""
        self._close("end")

    def fail(self, status: int, error: str, *, retry: bool = False) -> None:
        self._close("error", {"status": status, "error": error, "retry": retry})

    # -- the pump ---------------------------------------------------------------------
    async def pump(self) -> None:
        """Publish until the final frame has left."""
        while True:
            try:
                # asyncio.timeout, not wait_for: no task per frame on the hot path.
                async with asyncio.timeout(self._ping_interval):
                    await self._wake.wait()
            except TimeoutError:
                await self._publish("ping")
                continue
            self._wake.clear()
            if self._final is not None:
                await self._flush_final()
                return
            body = self._take_complete()
            if body:
                await self._publish_body(body, last=False)

    def _close(self, kind: FrameKind, meta: dict[str, Any] | None = None) -> None:
        self._final = Frame(kind, 0, self._attempt, meta=meta or {})
        self._wake.set()

    async def _flush_final(self) -> None:
        assert self._final is not None
        if self._final.kind == "end":
            body, self._buffer = bytes(self._buffer), bytearray()
            await self._publish_body(body, last=True)
            return
        body = self._take_complete()
        if body and self._head_sent:
            await self._publish("data", body)
        await self._publish("error", meta=self._final.meta)

    async def _publish_body(self, body: bytes, *, last: bool) -> None:
        if not self._head_sent and self._head is not None:
            self._head_sent = True
            await self._publish("head", body, {**self._head, "last": last})
        elif self._head_sent:
            await self._publish("end" if last else "data", body)

    def _take_complete(self) -> bytes:
        cut = self._buffer.rfind(self._separator)
        if cut < 0:
            return b""
        cut += len(self._separator)
        body = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        return body

    async def _publish(
        self, kind: FrameKind, body: bytes = b"", meta: dict[str, Any] | None = None
    ) -> None:
        frame = Frame(kind, self._seq, self._attempt, body, meta or {})
        self._seq += 1
        await self._redis.publish(self._channel, encode_frame(frame))
