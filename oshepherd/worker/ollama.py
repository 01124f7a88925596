"""The worker's view of its local Ollama: what it holds, and a request to forward."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["HostState", "OllamaHost", "OllamaUnreachable"]


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
        self._poll_timeout = poll_timeout
        # Generation can be silent for minutes (model loading): no read timeout on jobs.
        self.client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def poll(self) -> HostState:
        """Models, running models and version, fetched at once; never raises."""
        try:
            tags, ps, version = await asyncio.gather(
                self._get_json("/api/tags"), self._get_json("/api/ps"), self._get_json("/api/version")
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
            response = await self.client.get(path, timeout=self._poll_timeout)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise OllamaUnreachable(f"GET {path}: {exc!r}") from exc
        return data if isinstance(data, dict) else {}

    def request(self, method: str, path: str, body: str) -> httpx.Request:
        content = body.encode() if body else None
        # Identity encoding: the bytes relayed are the bytes Ollama wrote.
        headers = {"accept-encoding": "identity"}
        if content:
            headers["content-type"] = "application/json"
        return self.client.build_request(method, path, content=content, headers=headers)

    async def aclose(self) -> None:
        await self.client.aclose()
