"""The response that relays a job's frames to the client, byte for byte.

Status, content type and body all come from the job's frames (Ollama's own), not from the
route; a failure after the first byte ends the stream with an error line in its format.
A frame may hold several lines Ollama wrote in a burst; each NDJSON line and each SSE
event still leaves as an HTTP chunk of its own, as Ollama writes them (clients that parse
each read as one object rely on it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

from oshepherd.api.errors import JSON, ApiError, error_line, error_response
from oshepherd.api.jobstream import JobStream
from oshepherd.api.metrics import note_first_byte
from oshepherd.api.watched import WatchedResponse
from oshepherd.protocol import Data

__all__ = ["RelayResponse"]

log = logging.getLogger(__name__)

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
# Awaited before the answer's last bytes leave (e.g. a registry refresh after a load).
Settle = Callable[[], Awaitable[None]]
# A body cut into the pieces that leave as chunks of their own.
Split = Callable[[bytes], list[bytes]]


class RelayResponse(WatchedResponse):
    """The answer of the job ``stream`` follows, for a client of ``path``.

    ``settle``, if given, is awaited before the answer's last bytes are sent; an
    ``ApiError`` it raises is logged, and the answer ends as it would have.
    """

    def __init__(self, stream: JobStream, path: str, settle: Settle | None = None) -> None:
        super().__init__(path)
        self._stream = stream
        self._settle = settle

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
        split = _splitter(content_type)
        note_first_byte(head.status)
        if head.last and split is None:
            await self._settled()
            headers.append((b"content-length", str(len(head.body)).encode()))
            await send({"type": "http.response.start", "status": head.status, "headers": headers})
            await send({"type": "http.response.body", "body": head.body})
            return
        await send({"type": "http.response.start", "status": head.status, "headers": headers})
        rest = head.body
        try:
            if not head.last:
                await _send_pieces(send, head.body, split)
                while isinstance(frame := await self._stream.next(), Data):
                    await _send_pieces(send, frame.body, split)
                rest = frame.body
        except ApiError as exc:
            log.warning("job %s: failed mid-stream: %s", self._stream.job.id, exc.message)
            sse = content_type.startswith(SSE)
            await send(
                {"type": "http.response.body", "body": error_line(self.path, exc.message, sse=sse)}
            )
            return
        await self._settled()
        await _send_last(send, rest, split)

    async def _settled(self) -> None:
        if self._settle is None:
            return
        try:
            await self._settle()
        except ApiError as exc:
            log.warning("job %s: could not settle: %s", self._stream.job.id, exc.message)


def _splitter(content_type: str) -> Split | None:
    """How a body of ``content_type`` divides into the chunks Ollama writes: NDJSON lines,
    SSE events, or None (left whole)."""
    if content_type.startswith(NDJSON):
        return _lines
    if content_type.startswith(SSE):
        return _events
    return None


def _lines(body: bytes) -> list[bytes]:
    # JSON lines hold no raw CR (JSON escapes it), so splitlines cuts at each LF only.
    return body.splitlines(keepends=True)


def _events(body: bytes) -> list[bytes]:
    events = body.split(b"\n\n")
    tail = events.pop()  # after the last blank line: empty, or a partial last event
    pieces = [event + b"\n\n" for event in events]
    if tail:
        pieces.append(tail)
    return pieces


async def _send_pieces(send: Send, body: bytes, split: Split | None) -> None:
    """``body`` as one chunk per line or event, more to come."""
    if not body:
        return
    for piece in split(body) if split is not None else (body,):
        await send({"type": "http.response.body", "body": piece, "more_body": True})


async def _send_last(send: Send, body: bytes, split: Split | None) -> None:
    """The answer's rest, ``body``, one chunk per line or event, and its end."""
    pieces = split(body) if split is not None and body else [body]
    for piece in pieces[:-1]:
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": pieces[-1]})
