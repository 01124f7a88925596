"""Reading request bodies: JSON whatever the Content-Type, bounded, checked where we read."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from oshepherd.api.errors import BadRequest, ContentTooLarge

__all__ = ["Body", "model_name", "read_body", "stream_flag"]

MAX_MODEL_NAME = 512


class Body:
    """A client's JSON object, and its exact text (forwarded to Ollama unchanged)."""

    __slots__ = ("data", "text")

    def __init__(self, text: str, data: dict[str, Any]) -> None:
        self.text = text
        self.data = data


async def read_body(request: Request, limit: int) -> Body:
    raw = await _read_bounded(request, limit)
    if not raw.strip():
        raise BadRequest("missing request body")
    try:
        text = raw.decode()
        data = orjson.loads(text)
    except UnicodeDecodeError:
        raise BadRequest("invalid request body: not valid UTF-8") from None
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("invalid request body: expected a JSON object")
    return Body(text, data)


async def _read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ContentTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ContentTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def model_name(data: dict[str, Any], *fields: str) -> str:
    """The model a request names (first of ``fields`` present), checked like Ollama does."""
    value = next((data[f] for f in fields if data.get(f) is not None), None)
    if value is None or value == "":
        raise BadRequest("model is required")
    if not isinstance(value, str):
        raise BadRequest(f"invalid model name: expected a string, got {type(value).__name__}")
    if len(value) > MAX_MODEL_NAME or not value.isprintable() or value != value.strip():
        raise BadRequest("invalid model name")
    return value


def stream_flag(data: dict[str, Any], default: bool) -> bool:
    value = data.get("stream")
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(
            f"invalid value for 'stream': expected a boolean, got {type(value).__name__}"
        )
    return value
