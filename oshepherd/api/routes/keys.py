"""Key management over HTTP, for admin keys (``Authenticate`` asks an admin scope of every
``/oshepherd/*`` route): the same ``KeyStore`` as ``oshepherd keys``, run in a thread.

* ``GET /oshepherd/v1/keys``: ``{"keys": [key, ...]}``, oldest first.
* ``POST /oshepherd/v1/keys`` with ``{"name", "scope", "models", "priority",
  "max_concurrent", "rpm", "tokens_per_day", "allow_ips"}`` (``name`` required): 201 with
  the key and, once only, its secret in ``"key"``.
* ``PATCH /oshepherd/v1/keys/{id or name}`` with the fields to change (``null`` removes a
  limit): the key as now.
* ``DELETE /oshepherd/v1/keys/{id or name}``: the revoked key.

A key is shown as ``keys.public`` (never its secret or digest). A bad field is a 400
``invalid_key_field``; an id or name no key has (or several share) is a 404 ``unknown_key``;
errors take Ollama's shape. The replica that made a change reloads its table before it
answers; the others within a second (``KeyTable``).

While no key exists these routes answer 403 ``keys_off``: the first key is made with
``oshepherd keys create``, by someone who can reach Redis. Otherwise anyone who reaches an
open API could create the first admin key and lock everyone else out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from fastapi import APIRouter, Request
from starlette.responses import Response

from oshepherd.api.auth import KeyTable
from oshepherd.api.bodies import read_body
from oshepherd.api.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    RedisUnavailable,
    json_response,
)
from oshepherd.api.gateway import gateway
from oshepherd.connections import sync_redis
from oshepherd.keys import InvalidKey, KeyStore, UnknownKey, public

__all__ = ["router"]

router = APIRouter(prefix="/oshepherd/v1/keys")
T = TypeVar("T")


@router.get("", response_model=None)
async def list_keys(request: Request) -> Response:
    keys = await _store(request, lambda store: store.list_keys())
    return json_response({"keys": [public(key) for key in keys]})


@router.post("", response_model=None)
async def create_key(request: Request) -> Response:
    values = (await read_body(request, gateway(request).settings.max_body_bytes)).data
    secret, key = await _store(request, lambda store: store.create(values))
    return json_response({**public(key), "key": secret}, status=201)


@router.patch("/{ref}", response_model=None)
async def update_key(request: Request, ref: str) -> Response:
    values = (await read_body(request, gateway(request).settings.max_body_bytes)).data
    key = await _store(request, lambda store: store.update(ref, values))
    return json_response(public(key))


@router.delete("/{ref}", response_model=None)
async def revoke_key(request: Request, ref: str) -> Response:
    key = await _store(request, lambda store: store.revoke(ref))
    return json_response(public(key))


async def _store(request: Request, action: Callable[[KeyStore], T]) -> T:
    """``action`` on a ``KeyStore`` in a thread, then this replica's table reloaded; the
    store's errors as ``ApiError``s, and ``Forbidden`` while keys are off."""
    gw = gateway(request)
    table: KeyTable = request.app.state.keys
    if not table.keys:
        raise Forbidden(
            "no API key exists yet: create the first one with `oshepherd keys create`",
            code="keys_off",
        )
    try:
        result = await asyncio.to_thread(_run, gw.settings.redis, action)
        await table.refresh(gw.redis)
    except InvalidKey as exc:
        raise BadRequest(str(exc), code="invalid_key_field") from exc
    except UnknownKey as exc:
        raise ApiError(404, str(exc.args[0]), code="unknown_key") from exc
    except redis.RedisError as exc:
        raise RedisUnavailable(exc) from exc
    return result


def _run(url: str, action: Callable[[KeyStore], Any]) -> Any:
    with sync_redis(url, socket_connect_timeout=2, socket_timeout=5) as client:
        return action(KeyStore(client))
