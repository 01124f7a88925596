"""The API's HTTP protocol: what one turn of the event loop writes leaves in one system call.

The relay sends each NDJSON line or SSE event as an ASGI message of its own, so that each
leaves as an HTTP chunk of its own, as Ollama writes them. uvicorn writes every message to
its transport at once, and uvloop sends every write straight away: one ``send`` system
call per line, which on a fast stream cost the API more than the rest of its work per
line. Here the writes of one turn are gathered and handed to the transport together
(``writelines``: one ``writev``) at the end of the turn, chunk framing untouched. Nothing
waits: the flush is the next callback of the same loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpProtocol", "TurnWriter"]


class TurnWriter:
    """A transport whose writes within one turn of the loop leave together."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._transport.writelines(pending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a ``TurnWriter``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.transport = TurnWriter(self.transport, self.loop)  # type: ignore[assignment]
