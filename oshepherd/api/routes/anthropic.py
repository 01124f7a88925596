"""Anthropic's surface (``/v1/messages``, what Claude Code speaks): a job on the model's queue.

Workers forward it to their Ollama's own ``/v1/messages`` (Ollama's ``middleware/anthropic.go``
turns it into a chat), so message objects, SSE events (``message_start`` … ``message_stop``),
tool_use blocks and Ollama's errors reach the client as Ollama wrote them; the gateway only
routes by ``model``. The errors it makes itself take Anthropic's shape by path
(``errors.error_body``). ``stream`` omitted means a single message object, as Anthropic's.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from oshepherd.api.routes.ollama import forward, route

__all__ = ["router"]

router = APIRouter()


@route("/v1/messages", ["POST"], router, slash=False)
async def messages(request: Request) -> Response:
    return await forward(request, "/v1/messages", fields=("model",))
