"""The one publisher of a job's frames: coalesces what Ollama wrote, pings while it is silent.

The reader (the Ollama response) only appends bytes; a single pump coroutine publishes.
While a publish is in flight, more lines pile up and leave in the next frame, so a fast
stream costs few Redis round trips and a slow one adds no latency. Only complete lines
(NDJSON) or events (SSE) leave; a gap-free ``seq`` lets the API prove nothing was lost.
This is the worker's end of the API's ``Inbox``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from oshepherd.protocol import Data, End, Error, Frame, Head, Ping
from oshepherd.tokens import NO_COUNTS, Counts

__all__ = ["Outbox", "Publish"]

# Redis's PUBLISH: (channel, message) -> the number of receivers.
Publish = Callable[[str, bytes], Awaitable[Any]]


class Outbox:
    """The frames of one attempt of one job, published on ``channel`` after its ``Start``
    (``seq`` 0, sent by the start script)."""

    def __init__(
        self, publish: Publish, channel: str, attempt: int, *, ping_interval: float
    ) -> None:
        self._publish_raw = publish
        self._channel = channel
        self._attempt = attempt
        self._ping_interval = ping_interval
        self._seq = 1
        self._buffer = bytearray()
        self._separator = b"\n"
        self._answer: tuple[int, str] | None = None  # Ollama's status and content type
        self._head_sent = False
        self._final: End | Error | None = None
        self._counts = NO_COUNTS
        self._wake = asyncio.Event()

    # -- the reader's side: synchronous, never waits on Redis --------------------------
    def start(self, status: int, content_type: str) -> None:
        """Ollama answered: the head leaves with the first complete line."""
        if content_type.startswith("text/event-stream"):
            self._separator = b"\n\n"
        self._answer = (status, content_type)

    def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        self._wake.set()

    def finish(self, counts: Counts = NO_COUNTS) -> None:
        """Ollama's response is complete: flush everything, including a partial last line;
        the final frame carries the tokens Ollama counted."""
        self._counts = counts
        self._close(End(seq=0, attempt=self._attempt))

    def fail(self, status: int, error: str, *, retry: bool = False) -> None:
        """The attempt failed (``retry``: before it reached Ollama): after the complete
        lines already written, an ``Error`` ends it."""
        self._close(Error(seq=0, attempt=self._attempt, status=status, error=error, retry=retry))

    # -- the pump ---------------------------------------------------------------------
    async def pump(self) -> None:
        """Publish until the final frame has left."""
        while True:
            try:
                # asyncio.timeout, not wait_for: no task per frame on the hot path.
                async with asyncio.timeout(self._ping_interval):
                    await self._wake.wait()
            except TimeoutError:
                await self._publish(Ping(seq=self._seq, attempt=self._attempt))
                continue
            self._wake.clear()
            if self._final is not None:
                await self._flush_final(self._final)
                return
            body = self._take_complete()
            if body:
                await self._publish_body(body, last=False)

    def _close(self, final: End | Error) -> None:
        self._final = final
        self._wake.set()

    async def _flush_final(self, final: End | Error) -> None:
        if isinstance(final, End):
            body, self._buffer = bytes(self._buffer), bytearray()
            await self._publish_body(body, last=True)
            return
        body = self._take_complete()
        if body and self._head_sent:
            await self._publish(Data(seq=self._seq, attempt=self._attempt, body=body))
        await self._publish(replace(final, seq=self._seq))

    async def _publish_body(self, body: bytes, *, last: bool) -> None:
        seq, attempt, counts = self._seq, self._attempt, self._counts
        if self._head_sent:
            if last:
                end = End(seq=seq, attempt=attempt, body=body, prompt_tokens=counts.prompt,
                          completion_tokens=counts.completion,
                          eval_duration=counts.eval_duration)  # fmt: skip
                await self._publish(end)
            else:
                await self._publish(Data(seq=seq, attempt=attempt, body=body))
        elif self._answer is not None:
            self._head_sent = True
            status, content_type = self._answer
            head = Head(seq=seq, attempt=attempt, body=body, status=status,
                        content_type=content_type, last=last, prompt_tokens=counts.prompt,
                        completion_tokens=counts.completion,
                        eval_duration=counts.eval_duration)  # fmt: skip
            await self._publish(head)

    def _take_complete(self) -> bytes:
        cut = self._buffer.rfind(self._separator)
        if cut < 0:
            return b""
        cut += len(self._separator)
        body = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        return body

    async def _publish(self, frame: Frame) -> None:
        self._seq += 1
        await self._publish_raw(self._channel, frame.encode())
