"""The web dashboard at ``/oshepherd/`` (docs/dashboard.md) and the one figure it needs that
the fleet API has no JSON for: the time to first token.

``GET /oshepherd/``: the page, ``GET /oshepherd/assets/<file>``: its script and style sheet,
all static files shipped in the package (``oshepherd/api/static``): no build step, nothing
fetched from elsewhere. They hold no data and need no key (``auth.OPEN_PATHS``,
``auth.OPEN_PREFIXES``); the page reads ``/oshepherd/v1/fleet`` and ``/oshepherd/v1/ttft``
about once a second with the admin key it asks for (once keys exist), which the browser keeps
in ``sessionStorage`` and sends as ``x-api-key``.

``GET /oshepherd/v1/ttft``: this API process's TTFT histogram (``metrics.TTFT``, the one
``/metrics`` exposes; nothing counted twice) as JSON, ``{"process", "enabled", "models":
[{"model", "count", "sum", "buckets": [[le, cumulative count], ...]}, ...]}``: seconds,
counts since the process started, buckets in increasing ``le`` with ``+Inf`` as null,
models sorted. ``process`` names this process (a new one restarts the counts); ``enabled``
is false when ``METRICS`` is off and nothing is counted. A client takes the difference of two
readings for the requests in between (the dashboard does, over its last minute).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

from oshepherd.api import metrics
from oshepherd.api.errors import json_response
from oshepherd.api.gateway import gateway
from oshepherd.protocol import new_id

__all__ = ["ASSETS", "PAGE", "STATIC", "assets", "router", "ttft_histograms"]

router = APIRouter()

STATIC = Path(__file__).resolve().parent.parent / "static"
PAGE = "/oshepherd/"
ASSETS = "/oshepherd/assets"
PROCESS = new_id()[:12]  # this API process, in ``/oshepherd/v1/ttft``


@router.api_route(PAGE, methods=["GET", "HEAD"], response_model=None)
async def page() -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/oshepherd/v1/ttft", response_model=None)
async def read_ttft(request: Request) -> Response:
    enabled = gateway(request).settings.metrics
    return json_response({"process": PROCESS, "enabled": enabled, "models": ttft_histograms()})


def assets() -> StaticFiles:
    """The page's script and style sheet, to mount at ``ASSETS``."""
    return StaticFiles(directory=STATIC / "assets")


def ttft_histograms() -> list[dict[str, Any]]:
    """``metrics.TTFT`` per model (see the module), read from prometheus_client's samples."""
    models: dict[str, dict[str, Any]] = {}
    for family in metrics.TTFT.collect():
        for sample in family.samples:
            model = sample.labels["model"]
            row = models.setdefault(model, {"model": model, "count": 0, "sum": 0.0, "buckets": []})
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                row["buckets"].append([le if math.isfinite(le) else None, int(sample.value)])
            elif sample.name.endswith("_count"):
                row["count"] = int(sample.value)
            elif sample.name.endswith("_sum"):
                row["sum"] = sample.value
    return [models[m] for m in sorted(models)]
