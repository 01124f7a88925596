"""OpenAI's surface (``/v1``): completions and embeddings are jobs, models come from the registry.

Workers forward ``/v1`` jobs to their Ollama's own ``/v1`` endpoints, so bodies, SSE events
and Ollama's errors reach the client as Ollama wrote them; the gateway only routes by
``model``. The errors it makes itself take OpenAI's shape by path (``errors.error_body``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from oshepherd.api.errors import ModelNotFound, json_response
from oshepherd.api.routes.ollama import forward, healthy_workers, merged
from oshepherd.models import entry_model, entry_name, normalize

__all__ = ["router"]

router = APIRouter(prefix="/v1")
MODEL_FIELD = ("model",)  # OpenAI's requests have no "name" alias
DEFAULT_OWNER = "library"  # Ollama's namespace of a name without one


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    return await forward(request, "/v1/chat/completions", fields=MODEL_FIELD)


@router.post("/completions", response_model=None)
async def completions(request: Request) -> Response:
    return await forward(request, "/v1/completions", fields=MODEL_FIELD)


@router.post("/embeddings", response_model=None)
async def embeddings(request: Request) -> Response:
    return await forward(request, "/v1/embeddings", fields=MODEL_FIELD)


@router.get("/models", response_model=None)
async def list_models(request: Request) -> Response:
    entries = merged(healthy_workers(request), "models")
    return json_response({"object": "list", "data": [_model(entry_name(e), e) for e in entries]})


@router.get("/models/{model:path}", response_model=None)
async def retrieve_model(request: Request, model: str) -> Response:
    """One model, ``id`` echoed as asked (names hold ':' and '/', hence the path converter)."""
    wanted = normalize(model)
    for entry in merged(healthy_workers(request), "models"):
        if entry_model(entry) == wanted:
            return json_response(_model(model, entry))
    raise ModelNotFound(model)


def _model(model_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Ollama's mapping: ``created`` is when the model was last modified, ``owned_by`` the
    namespace of its name (``[host/][namespace/]model[:tag]``)."""
    segments = model_id.split("/")
    owner = segments[-2] if len(segments) > 1 else DEFAULT_OWNER
    return {"id": model_id, "object": "model", "created": _created(entry), "owned_by": owner}


def _created(entry: dict[str, Any]) -> int:
    try:
        return int(datetime.fromisoformat(str(entry.get("modified_at"))).timestamp())
    except ValueError:
        return 0
