"""The ASGI response that relays a job's frames to the client, byte for byte.

It races the relay against ``http.disconnect`` (as Starlette's ``StreamingResponse`` does),
so a client that hangs up, even while Ollama is silent, cancels its job at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from oshepherd.api.errors import JSON, ApiError, error_body, error_response
from oshepherd.api.jobs import JobStream
from oshepherd.protocol import Frame

__all__ = ["RelayResponse", "WatchedResponse", "until_disconnect"]

log = logging.getLogger(__name__)


class WatchedResponse(Response):
    """A response written by ``respond`` while the client stays; ``close`` runs whatever
    happens, after the work was cancelled if the client hung up."""

    def __init__(self) -> None:
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if await until_disconnect(receive, self.respond(scope, receive, send)):
                log.info("%s: client went away", self)
        finally:
            await self.close()

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class RelayResponse(WatchedResponse):
    """Status, headers and body all come from the job's frames, not from the constructor."""

    def __init__(self, stream: JobStream, path: str) -> None:
        super().__init__()
        self._stream = stream
        self._path = path

    def __str__(self) -> str:
        return f"job {self._stream.job.id}"

    async def close(self) -> None:
        await self._stream.close()

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            head = await self._stream.next()
        except ApiError as exc:
            await error_response(self._path, exc)(scope, receive, send)
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
        body = error_body(self._path, 500, message)
        return b"data: " + body + b"\n\n" if sse else body + b"\n"


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
