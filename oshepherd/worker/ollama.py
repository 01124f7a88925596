"""The worker's view of its local Ollama: what it holds, and requests forwarded to it.

aiohttp rather than httpx on this hop: it costs about half as much per request, and
``iter_any`` hands over everything Ollama has written so far in one piece, which is the
coalescing the relay wants.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["TRANSPORT_ERRORS", "HostState", "OllamaHost", "OllamaUnreachable"]

# What "Ollama did not answer, or broke off" looks like on this hop.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class OllamaUnreachable(Exception):
    """The local Ollama did not answer (refused, timed out, reset)."""


@dataclass(slots=True)
class HostState:
    """What the last poll of the host saw."""

    healthy: bool = False
    version: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


class OllamaHost:
    """One keep-alive connection pool to one Ollama, shared by every job of the worker."""

    def __init__(self, base_url: str, *, poll_timeout: float = 5.0) -> None:
        self.base_url = base_url
        self._poll_timeout = aiohttp.ClientTimeout(total=poll_timeout)
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
        """Models, running models and version, fetched at once; never raises."""
        try:
            tags, ps, version = await asyncio.gather(
                self._get_json("/api/tags"),
                self._get_json("/api/ps"),
                self._get_json("/api/version"),
            )
        except OllamaUnreachable as exc:
            return HostState(healthy=False, error=str(exc))
        return HostState(
            healthy=True,
            version=str(version.get("version", "")),
            models=list(tags.get("models") or []),
            running=list(ps.get("models") or []),
        )

    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            async with self.session.get(path, timeout=self._poll_timeout) as response:
                response.raise_for_status()
                data = await response.json(content_type=None)
        except (*TRANSPORT_ERRORS, ValueError) as exc:
            raise OllamaUnreachable(f"GET {path}: {exc!r}") from exc
        return data if isinstance(data, dict) else {}

    def request(self, method: str, path: str, body: str) -> aiohttp.client._RequestContextManager:
        """Forward a job's request; the caller reads the response as a stream."""
        headers = {"Content-Type": "application/json"} if body else {}
        return self.session.request(method, path, data=body.encode() or None, headers=headers)

    async def aclose(self) -> None:
        await self.session.close()
