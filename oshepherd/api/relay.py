"""The ASGI response that relays a job's frames to the client, byte for byte.

It races the relay against ``http.disconnect`` (as Starlette's ``StreamingResponse`` does),
so a client that hangs up, even while Ollama is silent, cancels its job at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from oshepherd.api.errors import JSON, ApiError, error_body
from oshepherd.api.jobs import JobStream
from oshepherd.protocol import Frame

__all__ = ["RelayResponse", "until_disconnect"]

log = logging.getLogger(__name__)


class RelayResponse(Response):
    """Status, headers and body all come from the job's frames, not from the constructor."""

    def __init__(self, stream: JobStream, path: str) -> None:
        self._stream = stream
        self._path = path
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if await until_disconnect(receive, self._relay(send)):
                log.info("job %s: client went away", self._stream.job.id)
        finally:
            await self._stream.close()

    async def _relay(self, send: Send) -> None:
        try:
            head = await self._stream.next()
        except ApiError as exc:
            await self._send_error(send, exc)
            return
        status = int(head.meta.get("status", 200))
        content_type = str(head.meta.get("content_type") or JSON)
        headers = [(b"content-type", content_type.encode())]
        if head.meta.get("last"):
            headers.append((b"content-length", str(len(head.body)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": head.body})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if head.body:
            await send({"type": "http.response.body", "body": head.body, "more_body": True})
        sse = content_type.startswith("text/event-stream")
        while True:
            frame = await self._stream.next()
            if frame.kind == "data":
                await send({"type": "http.response.body", "body": frame.body, "more_body": True})
                continue
            body = frame.body if frame.kind == "end" else self._error_line(frame, sse)
            await send({"type": "http.response.body", "body": body})
            return

    def _error_line(self, frame: Frame, sse: bool) -> bytes:
        """A mid-stream failure: a final error line/event in the stream's own format."""
        message = str(frame.meta.get("error", "the job failed"))
        log.warning("job %s: failed mid-stream: %s", self._stream.job.id, message)
        if sse:
            return b"data: " + error_body(self._path, 500, message) + b"\n\n"
        return orjson.dumps({"error": message}) + b"\n"

    async def _send_error(self, send: Send, exc: ApiError) -> None:
        headers = [(b"content-type", JSON.encode())]
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        body = error_body(self._path, exc.status, exc.message)
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` until it ends or the client hangs up, which cancels it; True if it hung up."""
    task = asyncio.create_task(work)
    watch = asyncio.create_task(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task not in done
    finally:
        watch.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
