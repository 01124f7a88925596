"""The worker's view of its local Ollama: what it holds, and requests forwarded to it.

aiohttp rather than httpx on this hop: it costs about half as much per request, and
``iter_any`` hands over everything Ollama has written so far in one piece, which is the
coalescing the relay wants.

aiohttp's, the OS's and timeout errors are translated here, once, into two::

    OllamaError
    ├── OllamaUnreachable   no answer: refused, reset or timed out before the status line
    └── OllamaStreamBroke   the answer began, then broke off
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = [
    "HostState",
    "OllamaError",
    "OllamaHost",
    "OllamaResponse",
    "OllamaStreamBroke",
    "OllamaUnreachable",
]

POLL_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
# A request body: its bytes, or chunks streamed as they come (a blob upload).
RequestBody = bytes | AsyncIterable[bytes | memoryview]
# What "Ollama did not answer, or broke off" looks like on this hop (TimeoutError is an
# OSError).
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)


class OllamaError(Exception):
    """The local Ollama failed us; the message says how."""


class OllamaUnreachable(OllamaError):
    """The local Ollama did not answer (refused, timed out, reset)."""


class OllamaStreamBroke(OllamaError):
    """The local Ollama's answer broke off after it began."""


@dataclass(slots=True)
class HostState:
    """What the last poll of the host saw: its ``/api/version``, ``/api/tags`` entries,
    ``/api/ps`` entries and ``/api/status`` cloud policy, or the error that kept it from
    answering."""

    healthy: bool = False
    version: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    cloud: dict[str, Any] = field(default_factory=dict)


class OllamaResponse:
    """Ollama's status line and headers; its body is read with ``chunks``."""

    __slots__ = ("_response", "content_type", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as Ollama writes it; raises ``OllamaStreamBroke``."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except _TRANSPORT_ERRORS as exc:
            raise OllamaStreamBroke(f"Ollama stream broke: {exc!r}") from exc


class OllamaHost:
    """One keep-alive connection pool to one Ollama, shared by every job of the worker."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        # Generation can be silent for minutes (model loading): no read timeout on jobs.
        # No decompression: the bytes relayed are the bytes Ollama wrote.
        self.session = aiohttp.ClientSession(
            base_url,
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    async def poll(self) -> HostState:
        """Models, running models, version and cloud policy, fetched at once; never
        raises. An Ollama without ``/api/status`` (older) has no cloud policy to report."""
        try:
            tags, ps, version, status = await asyncio.gather(
                self._get_json("/api/tags"),
                self._get_json("/api/ps"),
                self._get_json("/api/version"),
                self._get_json("/api/status", optional=True),
            )
        except OllamaUnreachable as exc:
            return HostState(healthy=False, error=str(exc))
        return HostState(
            healthy=True,
            version=str(version.get("version", "")),
            models=list(tags.get("models") or []),
            running=list(ps.get("models") or []),
            cloud=cloud if isinstance(cloud := status.get("cloud"), dict) else {},
        )

    async def _get_json(self, path: str, *, optional: bool = False) -> dict[str, Any]:
        """Ollama's JSON object at ``path`` ({} if it is no object); raises
        ``OllamaUnreachable``. An ``optional`` route answering an error status (an older
        Ollama, a proxy refusing it) reads as {}: the host is no less healthy for it."""
        try:
            async with self.session.get(path, timeout=POLL_TIMEOUT) as response:
                if optional and response.status >= 400:
                    return {}
                response.raise_for_status()
                data = await response.json(content_type=None)
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            raise OllamaUnreachable(f"GET {path}: {exc!r}") from exc
        return data if isinstance(data, dict) else {}

    @asynccontextmanager
    async def send(
        self, method: str, path: str, body: RequestBody, content_type: str
    ) -> AsyncIterator[OllamaResponse]:
        """Forward a job's request (``body``: its bytes, sent with ``content_type`` unless
        empty, or an async iterable of them, streamed as they come) and hold its response.

        Raises ``OllamaUnreachable`` when Ollama does not answer; the body's chunks raise
        ``OllamaStreamBroke``. The connection goes back to the pool on exit.
        """
        headers = {"Content-Type": content_type} if body else {}
        try:
            response = await self.session.request(method, path, data=body or None, headers=headers)
        except _TRANSPORT_ERRORS as exc:
            raise OllamaUnreachable(f"{method} {path}: {exc!r}") from exc
        try:
            yield OllamaResponse(response)
        finally:
            response.release()

    async def aclose(self) -> None:
        await self.session.close()
