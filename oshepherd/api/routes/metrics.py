"""Prometheus scrapes and the probes of load balancers and Kubernetes (docs/metrics.md).

``GET /metrics``: this API process's metrics; ``GET /metrics/fleet``: the fleet's, the same
from every replica (``oshepherd.api.metrics``), or 503 while the registry is out of date.
Both in Prometheus's text format; once API keys exist they need an admin key or the
``METRICS_TOKEN`` bearer (``Authenticate``).

``GET|HEAD /healthz``: 200 ``{"status": "ok"}`` while the process serves. ``GET|HEAD
/readyz``: 200 ``{"status": "ready", "redis": true, "registry": true}`` when Redis answers a
PING within ``READY_TIMEOUT`` and the view of the fleet is current (refreshed within three
intervals), else 503 with ``"status": "unready"`` and which of the two failed. Neither
probe ever needs a key.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from redis.exceptions import RedisError
from starlette.responses import Response

from oshepherd.api import metrics
from oshepherd.api.errors import RedisUnavailable, json_response
from oshepherd.api.gateway import gateway

__all__ = ["READY_TIMEOUT", "router"]

router = APIRouter()

READY_TIMEOUT = 1.0  # seconds Redis has to answer the readiness probe's PING


@router.get("/metrics", response_model=None)
async def process_metrics() -> Response:
    return Response(metrics.exposition(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/fleet", response_model=None)
async def fleet_metrics(request: Request) -> Response:
    """The fleet's metrics from one snapshot read at once (one round trip), rendered by a
    registry made for it: the collector itself never blocks on Redis."""
    gw = gateway(request)
    if not gw.registry.current:  # no figures rather than an empty fleet (as /api/tags)
        raise RedisUnavailable("the fleet's registry is out of date")
    try:
        snapshot = await metrics.read_fleet(
            gw.redis, gw.registry.workers.values(), gw.registry.tenants
        )
    except RedisError as exc:
        raise RedisUnavailable(exc) from exc
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.FleetCollector(snapshot))
    return Response(metrics.exposition(registry), media_type=CONTENT_TYPE_LATEST)


@router.api_route("/healthz", methods=["GET", "HEAD"], response_model=None)
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.api_route("/readyz", methods=["GET", "HEAD"], response_model=None)
async def readyz(request: Request) -> Response:
    gw = gateway(request)
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            redis = bool(await gw.redis.ping())
    except (RedisError, OSError, TimeoutError):
        redis = False
    registry = gw.registry.current
    ready = redis and registry
    body = {"status": "ready" if ready else "unready", "redis": redis, "registry": registry}
    return json_response(body, 200 if ready else 503)
