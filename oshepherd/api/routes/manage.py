"""Model management across the fleet: pull, push, create, copy, delete, and blobs.

Each request runs on several workers at once, each against its own Ollama, and the answers
merge into one (``oshepherd.api.fanout``). By default pull, create, the blob check and
the blob upload (``oshepherd.api.blobs``) act on every live healthy worker; push, copy and
delete on the workers whose host has the model. A caller picks the workers itself with the
header ``X-Oshepherd-Workers: <worker id or hostname>,...`` or the query parameter
``?workers=<worker id or hostname>,...`` (the header wins when both are given); a name
matching no live worker is a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import APIRouter, Request
from starlette.responses import Response

from oshepherd.api.auth import check_model
from oshepherd.api.blobs import BlobUpload, BlobUploadResponse
from oshepherd.api.bodies import model_name, read_body, stream_flag
from oshepherd.api.errors import BadRequest, ModelNotFound, NoHealthyWorker
from oshepherd.api.fanout import Answer, Fanout, FanoutResponse
from oshepherd.api.gateway import Gateway, gateway
from oshepherd.api.routes.ollama import route
from oshepherd.models import normalize
from oshepherd.protocol import WorkerEntry

__all__ = ["WORKERS_HEADER", "router"]

router = APIRouter()
WORKERS_HEADER = "X-Oshepherd-Workers"
DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")  # Ollama's own check
Targets = Callable[[], list[WorkerEntry]]


@route("/api/pull", ["POST"], router)
async def pull(request: Request) -> Response:
    """Pull on every healthy worker (or the chosen ones): one merged progress stream."""
    return await _progress(request, "pull", holders=False)


@route("/api/push", ["POST"], router)
async def push(request: Request) -> Response:
    """Push from every worker whose host has the model (or the chosen ones)."""
    return await _progress(request, "push", holders=True)


@route("/api/create", ["POST"], router)
async def create(request: Request) -> Response:
    """Create on every healthy worker (or the chosen ones): one merged progress stream."""
    return await _progress(request, "create", holders=False)


@route("/api/copy", ["POST"], router)
async def copy(request: Request) -> Response:
    """Copy on every worker whose host has ``source``: 200 with an empty body if all did."""
    gw = gateway(request)
    body = await read_body(request, gw.settings.max_body_bytes)
    if not body.data.get("source") or not body.data.get("destination"):
        raise BadRequest("source and destination are required")
    source = model_name(body.data, "source")
    check_model(normalize(source))
    check_model(normalize(model_name(body.data, "destination")))
    targets = await _targets(request, gw, lambda: _holders(gw, source))
    return await _run(gw, "copy", "POST", "/api/copy", body.text, targets, "empty")


@route("/api/delete", ["DELETE"], router)
async def delete(request: Request) -> Response:
    """Delete on every worker whose host has the model: 200 with an empty body if all did."""
    gw = gateway(request)
    body = await read_body(request, gw.settings.max_body_bytes)
    model = model_name(body.data, "model", "name")
    check_model(normalize(model))
    targets = await _targets(request, gw, lambda: _holders(gw, model))
    return await _run(gw, "delete", "DELETE", "/api/delete", body.text, targets, "empty")


@route("/api/blobs/{digest}", ["HEAD"], router)
async def blob_check(request: Request) -> Response:
    """200 when every healthy worker's host (or every chosen one) has the blob, else 404."""
    gw = gateway(request)
    digest: str = request.path_params["digest"]
    if not DIGEST.fullmatch(digest):
        raise BadRequest("invalid digest format")
    targets = await _targets(request, gw, lambda: _healthy(gw))
    return await _run(gw, "blob check", "HEAD", f"/api/blobs/{digest}", "", targets, "empty")


@route("/api/blobs/{digest}", ["POST"], router)
async def blob_upload(request: Request) -> Response:
    """Stream the body to every healthy worker's host (or every chosen one), through Redis
    (``oshepherd.api.blobs``): 201 once every host has the blob (200 when each already
    had it), else the error of the hosts that failed, e.g. 400 ``blob upload failed on
    <worker>: digest mismatch, expected "<digest>", got "<digest>"``.
    """
    gw = gateway(request)
    digest: str = request.path_params["digest"]
    if not DIGEST.fullmatch(digest):
        raise BadRequest("invalid digest format")
    targets = await _targets(request, gw, lambda: _healthy(gw))
    upload = BlobUpload(gw.redis, gw.dispatcher, gw.inboxes, digest, targets)
    return BlobUploadResponse(upload, request.scope["path"])


async def _progress(request: Request, action: str, *, holders: bool) -> Response:
    gw = gateway(request)
    body = await read_body(request, gw.settings.max_body_bytes)
    model = model_name(body.data, "model", "name")
    check_model(normalize(model))
    answer: Answer = "stream" if stream_flag(body.data, default=True) else "object"
    targets = await _targets(request, gw, lambda: _holders(gw, model) if holders else _healthy(gw))
    return await _run(gw, action, "POST", f"/api/{action}", body.text, targets, answer)


async def _run(
    gw: Gateway,
    action: str,
    method: str,
    path: str,
    body: str,
    targets: list[WorkerEntry],
    answer: Answer,
) -> FanoutResponse:
    fanout = Fanout(gw.dispatcher, action, targets, progress=answer != "empty")
    await fanout.start(method, path, body)
    return FanoutResponse(fanout, answer, path)


async def _targets(request: Request, gw: Gateway, default: Targets) -> list[WorkerEntry]:
    """The workers named by the request, else ``default()``; sorted by id."""
    await gw.dispatcher.refresh_registry()
    named = request.headers.get(WORKERS_HEADER)
    if named is None:
        named = request.query_params.get("workers")
    if named is None:
        return default()
    names = [name.strip() for name in named.split(",") if name.strip()]
    if not names:
        raise BadRequest(f"{WORKERS_HEADER} names no worker")
    live = [w for w in gw.registry.workers.values() if gw.registry.alive(w.id)]
    chosen: dict[str, WorkerEntry] = {}
    for name in names:
        found = [w for w in live if name in (w.id, w.hostname)]
        if not found:
            raise BadRequest(f"unknown worker '{name}'")
        chosen.update((w.id, w) for w in found)
    return sorted(chosen.values(), key=lambda w: w.id)


def _healthy(gw: Gateway) -> list[WorkerEntry]:
    workers = gw.registry.healthy()
    if not workers:
        raise NoHealthyWorker()
    return workers


def _holders(gw: Gateway, model: str) -> list[WorkerEntry]:
    workers = sorted(gw.registry.holders(normalize(model)), key=lambda w: w.id)
    if not workers:
        raise ModelNotFound(model)
    return workers
