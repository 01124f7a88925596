"""Ollama's native API: model-bound calls become jobs, fleet calls read the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from oshepherd import durations
from oshepherd.api import scatter
from oshepherd.api.auth import caller, check_model, may_use
from oshepherd.api.bodies import Body, model_name, read_body, stream_flag
from oshepherd.api.errors import JSON, BadRequest, RedisUnavailable, json_response
from oshepherd.api.fanout import Fanout, FanoutResponse
from oshepherd.api.gateway import gateway
from oshepherd.api.registry import Registry
from oshepherd.api.relay import RelayResponse
from oshepherd.models import entry_model, normalize
from oshepherd.protocol import LOAD, UNLOAD, WorkerEntry

__all__ = ["router"]

router = APIRouter()
Check = Callable[[dict[str, Any]], None]
# A request's ``Job.residency``: LOAD, UNLOAD, or "" for an ordinary request.
Residency = Callable[[dict[str, Any]], str]
# The fleet's models merged: (normalized name, entry with its ``workers``), and the JSON.
Merged = tuple[list[tuple[str, dict[str, Any]]], bytes]


def route(
    path: str, methods: list[str], into: APIRouter = router, *, slash: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``path`` (and, with ``slash``, ``path/``: the original oshepherd documented
    it) on ``into``, for an endpoint that takes the ``Request`` alone (path parameters in
    ``request.path_params``).

    These are Starlette routes, not FastAPI's: no dependency solving, no response model,
    no OpenAPI entry. Measured in-process, FastAPI's request handling cost 27 to 38 us of
    API CPU per request on the routes every client calls, a twentieth of a tiny generate.
    """

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        for p in (path, path + "/") if slash and path != "/" else (path,):
            into.add_route(p, endpoint, methods=methods, include_in_schema=False)
        return endpoint

    return register


async def forward(
    request: Request,
    path: str,
    check: Check | None = None,
    *,
    fields: tuple[str, ...] = ("model", "name"),
    residency: Residency | None = None,
) -> Response:
    """Queue the request body for a worker holding its model and relay the answer.

    ``fields`` may name the model (OpenAI's surface knows no ``name``). An embedding input
    longer than one batch is scattered over the fleet instead (``scatter``); a load or
    unload, as ``residency`` tells, follows the fleet (``load_or_unload``).
    """
    gw = gateway(request)
    body: Body = await read_body(request, gw.settings.max_body_bytes)
    model = model_name(body.data, *fields)
    stream_flag(body.data, default=True)
    if check is not None:
        check(body.data)
    if scatter.applies(path, body.data, gw.settings.embed_batch_size):
        return await scatter.scatter(request, path, body.data, model)
    if residency is not None and (kind := residency(body.data)):
        return await load_or_unload(request, path, body.text, model, kind)
    stream = await gw.dispatcher.submit("POST", path, body.text, model)
    return RelayResponse(stream, request.scope["path"])


async def load_or_unload(
    request: Request, path: str, text: str, model: str, residency: str
) -> Response:
    """A load runs on one holder of ``model``. An unload runs on every host where the
    model is loaded (each worker's ``/api/ps`` in the registry), and answers as Ollama
    does (``Fanout``'s "first" answer) once all have; loaded nowhere, it runs on one holder.

    Either way each worker re-registers what its host has loaded before it answers, and
    the API rereads the registry before it does, so ``/api/ps`` straight after is current.
    """
    gw = gateway(request)
    if residency == UNLOAD:
        name = normalize(model)
        check_model(name)
        await gw.dispatcher.refresh_registry(max_age=0.0)  # whoever loaded it just now too
        targets = [
            w for w in healthy_workers(request) if any(entry_model(e) == name for e in w.running)
        ]
        if targets:
            fanout = Fanout(gw.dispatcher, "unload", targets, progress=False)
            await fanout.start("POST", path, text, residency=UNLOAD)
            return FanoutResponse(fanout, "first", request.scope["path"])
    stream = await gw.dispatcher.submit("POST", path, text, model, residency=residency)
    return RelayResponse(
        stream, request.scope["path"], settle=lambda: gw.dispatcher.refresh_registry(max_age=0.0)
    )


def _residency(field: str, empty: tuple[Any, ...]) -> Residency:
    """Ollama's test for a load or unload (``server/routes.go``, GenerateHandler and
    ChatHandler): ``field`` (the prompt, the messages) is empty; a ``keep_alive`` of zero
    unloads, anything else loads."""

    def residency(data: dict[str, Any]) -> str:
        if data.get(field) not in empty:
            return ""
        return UNLOAD if durations.is_zero(data.get("keep_alive")) else LOAD

    return residency


GENERATE_RESIDENCY = _residency("prompt", (None, ""))
CHAT_RESIDENCY = _residency("messages", (None, []))


def _check_messages(data: dict[str, Any]) -> None:
    messages = data.get("messages")
    if messages is None:
        return
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("invalid value for 'messages': expected a list of message objects")


def _check_input(data: dict[str, Any]) -> None:
    value = data.get("input")
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest("invalid value for 'input': expected a string or a list of strings")


@route("/api/generate", ["POST"])
async def generate(request: Request) -> Response:
    return await forward(request, "/api/generate", residency=GENERATE_RESIDENCY)


@route("/api/chat", ["POST"])
async def chat(request: Request) -> Response:
    return await forward(request, "/api/chat", _check_messages, residency=CHAT_RESIDENCY)


@route("/api/embed", ["POST"])
async def embed(request: Request) -> Response:
    return await forward(request, "/api/embed", _check_input)


@route("/api/embeddings", ["POST"])
async def embeddings(request: Request) -> Response:
    return await forward(request, "/api/embeddings")


@route("/api/show", ["POST"])
async def show(request: Request) -> Response:
    return await forward(request, "/api/show")


@route("/", ["GET", "HEAD"])
async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


@route("/api/version", ["GET", "HEAD"])
async def version(request: Request) -> Response:
    """The lowest Ollama version in the fleet: clients gate features on it."""
    versions = [w.version for w in healthy_workers(request) if w.version]
    return json_response({"version": min(versions, key=_version_key, default="0.0.0")})


@route("/api/status", ["GET"])
async def status(request: Request) -> Response:
    """Ollama's ``StatusHandler`` for the fleet: ``{"cloud": {"disabled", "source"}}``.

    Cloud is disabled when any healthy host disables it, as Ollama's own clients fail
    closed on cloud policy (``app/tools/cloud_policy.go``); ``source`` is those hosts'
    source ("env", "config"), "both" when they differ, "none" when no host disables it.
    """
    return json_response({"cloud": fleet_cloud(healthy_workers(request))})


@route("/api/tags", ["GET", "HEAD"])
async def tags(request: Request) -> Response:
    """Every model of the fleet; ``HEAD`` answers the same headers without the body, as
    Ollama's ``r.HEAD("/api/tags", s.ListHandler)`` does."""
    return _merged_response(request, "models")


@route("/api/ps", ["GET"])
async def ps(request: Request) -> Response:
    return _merged_response(request, "running")


def healthy_workers(request: Request) -> list[WorkerEntry]:
    """The fleet's healthy workers, by id; ``RedisUnavailable`` when the registry is not
    current (Redis is gone: an empty fleet would be a lie)."""
    return _current(request).healthy()


def _current(request: Request) -> Registry:
    """The registry, if current; else ``RedisUnavailable``."""
    registry = gateway(request).registry
    if not registry.current:
        raise RedisUnavailable("the fleet's registry is out of date")
    return registry


def merged(request: Request, field: str) -> list[dict[str, Any]]:
    """One entry per model across the healthy workers' ``field`` ("models", "running")
    that the caller may use (its key's models), Ollama's shape plus the ``workers`` holding
    it (shared: read only). ``RedisUnavailable`` as ``healthy_workers``."""
    return [entry for name, entry in _fleet_merged(request, field)[0] if may_use(name)]


def _merged_response(request: Request, field: str) -> Response:
    """``{"models": merged(request, field)}``; for a caller whose key limits no model, the
    JSON built once per registry refresh."""
    entries, body = _fleet_merged(request, field)
    key = caller().key
    if key is None or not key.models:
        return Response(body, media_type=JSON)
    return json_response({"models": [e for name, e in entries if key.allows_model(name)]})


def _fleet_merged(request: Request, field: str) -> Merged:
    """Every model of the healthy workers' ``field`` with its name, merged, and their JSON
    as ``{"models": [...]}``: built once per registry refresh (``Registry.derived``), not on
    each request, as it reads every worker's entry."""
    registry = _current(request)
    return registry.derived(field, lambda: _merge(registry.healthy(), field))


def _merge(workers: Iterable[WorkerEntry], field: str) -> Merged:
    by_name: dict[str, dict[str, Any]] = {}
    for worker in workers:
        for entry in getattr(worker, field):
            merged_entry = by_name.setdefault(entry_model(entry), {**entry, "workers": []})
            merged_entry["workers"].append(worker.id)
    return list(by_name.items()), orjson.dumps({"models": list(by_name.values())})


def fleet_cloud(workers: Iterable[WorkerEntry]) -> dict[str, Any]:
    """The fleet's ``api.CloudStatus`` from its hosts' (``WorkerEntry.cloud``)."""
    sources = {str(w.cloud.get("source")) for w in workers if w.cloud.get("disabled") is True}
    if not sources:
        return {"disabled": False, "source": "none"}
    return {"disabled": True, "source": sources.pop() if len(sources) == 1 else "both"}


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("-")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
