"""Usage over HTTP, for admin keys (``Authenticate`` asks an admin scope of every
``/oshepherd/*`` route): what ``oshepherd usage`` prints.

``GET /oshepherd/v1/usage?days=N&key=ID``: ``{"days": [day, ...], "usage": [row, ...]}``,
the last ``N`` UTC days (default 1: today, at most 400), of the key ``ID`` (the id
``oshepherd keys list`` shows; ``key=`` alone: requests without a key) or of every key.
A row is ``{"day", "key", "model", "requests", "prompt_tokens", "completion_tokens"}``,
sorted by day, key and model; ``key`` is "" for requests without a key. A bad ``days`` is a
400 in Ollama's shape.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from oshepherd import usage
from oshepherd.api.errors import RedisUnavailable, json_response
from oshepherd.api.gateway import gateway

__all__ = ["router"]

router = APIRouter(prefix="/oshepherd/v1/usage")


@router.get("", response_model=None)
async def read_usage(
    request: Request, days: int = Query(1, ge=1, le=usage.MAX_DAYS), key: str | None = None
) -> Response:
    when = usage.days(days)
    try:
        rows = await usage.read(gateway(request).redis, when, key)
    except RedisError as exc:
        raise RedisUnavailable(exc) from exc
    return json_response({"days": when, "usage": [row.to_dict() for row in rows]})
