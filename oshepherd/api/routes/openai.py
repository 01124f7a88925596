"""OpenAI's surface (``/v1``): completions, responses, embeddings and transcriptions are jobs,
models come from the registry.

Workers forward ``/v1`` jobs to their Ollama's own ``/v1`` endpoints, so bodies, SSE events
and Ollama's errors reach the client as Ollama wrote them; the gateway only routes by
``model``. The errors it makes itself take OpenAI's shape by path (``errors.error_body``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from oshepherd.api.auth import check_model
from oshepherd.api.bodies import model_name, read_form
from oshepherd.api.errors import ModelNotFound, json_response
from oshepherd.api.gateway import gateway
from oshepherd.api.relay import RelayResponse
from oshepherd.api.routes.ollama import forward, merged, route
from oshepherd.models import entry_model, entry_name, normalize
from oshepherd.protocol import binary_body

__all__ = ["router"]

router = APIRouter()
MODEL_FIELD = ("model",)  # OpenAI's requests have no "name" alias
DEFAULT_OWNER = "library"  # Ollama's namespace of a name without one


@route("/v1/chat/completions", ["POST"], router, slash=False)
async def chat_completions(request: Request) -> Response:
    return await forward(request, "/v1/chat/completions", fields=MODEL_FIELD)


@route("/v1/completions", ["POST"], router, slash=False)
async def completions(request: Request) -> Response:
    return await forward(request, "/v1/completions", fields=MODEL_FIELD)


@route("/v1/embeddings", ["POST"], router, slash=False)
async def embeddings(request: Request) -> Response:
    return await forward(request, "/v1/embeddings", fields=MODEL_FIELD)


@route("/v1/responses", ["POST"], router, slash=False)
async def responses(request: Request) -> Response:
    """The Responses API (what Codex speaks), non-stateful as Ollama's ``openai/responses.go``:
    ``stream`` omitted means one response object, ``true`` its SSE events."""
    return await forward(request, "/v1/responses", fields=MODEL_FIELD)


@route("/v1/audio/transcriptions", ["POST"], router, slash=False)
async def transcriptions(request: Request) -> Response:
    """A multipart upload (``file``, ``model``, ...) carried to the worker as its exact bytes
    and Content-Type (``Job.content_type``); Ollama's ``TranscriptionMiddleware`` answers
    ``{"text": ...}``. Only the ``model`` field is read here, to route it."""
    gw = gateway(request)
    form = await read_form(request, gw.settings.max_body_bytes)
    model = model_name(form.fields, *MODEL_FIELD)
    body = binary_body(form.raw)
    stream = await gw.dispatcher.submit(
        "POST", "/v1/audio/transcriptions", body, model, content_type=form.content_type
    )
    return RelayResponse(stream, request.scope["path"])


@route("/v1/models", ["GET"], router, slash=False)
async def list_models(request: Request) -> Response:
    entries = merged(request, "models")
    return json_response({"object": "list", "data": [_model(entry_name(e), e) for e in entries]})


@route("/v1/models/{model:path}", ["GET"], router, slash=False)
async def retrieve_model(request: Request) -> Response:
    """One model, ``id`` echoed as asked (names hold ':' and '/', hence the path converter)."""
    model: str = request.path_params["model"]
    wanted = normalize(model)
    check_model(wanted)
    for entry in merged(request, "models"):
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
