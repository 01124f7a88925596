"""The response that relays a job's frames to the client, byte for byte.

Status, content type and body all come from the job's frames (Ollama's own), not from the
route; a failure after the first byte ends the stream with an error line in its format.
"""

from __future__ import annotations

import logging

from starlette.types import Receive, Scope, Send

from oshepherd.api.errors import JSON, ApiError, error_line, error_response
from oshepherd.api.jobstream import JobStream
from oshepherd.api.watched import WatchedResponse
from oshepherd.protocol import Data

__all__ = ["RelayResponse"]

log = logging.getLogger(__name__)

SSE = "text/event-stream"


class RelayResponse(WatchedResponse):
    """The answer of the job ``stream`` follows, for a client of ``path``."""

    def __init__(self, stream: JobStream, path: str) -> None:
        super().__init__(path)
        self._stream = stream

    def __str__(self) -> str:
        return f"job {self._stream.job.id}"

    async def close(self) -> None:
        await self._stream.close()

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            head = await self._stream.head()
        except ApiError as exc:
            await error_response(self.path, exc)(scope, receive, send)
            return
        content_type = head.content_type or JSON
        headers = [(b"content-type", content_type.encode())]
        if head.last:
            headers.append((b"content-length", str(len(head.body)).encode()))
            await send({"type": "http.response.start", "status": head.status, "headers": headers})
            await send({"type": "http.response.body", "body": head.body})
            return
        await send({"type": "http.response.start", "status": head.status, "headers": headers})
        if head.body:
            await send({"type": "http.response.body", "body": head.body, "more_body": True})
        try:
            while isinstance(frame := await self._stream.next(), Data):
                await send({"type": "http.response.body", "body": frame.body, "more_body": True})
        except ApiError as exc:
            log.warning("job %s: failed mid-stream: %s", self._stream.job.id, exc.message)
            sse = content_type.startswith("text/event-stream")
            await send(
                {"type": "http.response.body", "body": error_line(self.path, exc.message, sse=sse)}
            )
            return
        await send({"type": "http.response.body", "body": frame.body})
