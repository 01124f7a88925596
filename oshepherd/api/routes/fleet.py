"""The fleet API: what ``oshepherd status`` and the dashboard show, for admin keys
(``Authenticate`` asks an admin scope of every ``/oshepherd/*`` route once keys exist).

``GET /oshepherd/v1/workers``: ``{"workers": [worker, ...]}``, the live workers by id, each
``{"id", "hostname", "ollama_url", "version", "healthy", "error", "slots", "in_flight",
"models": [name, ...], "loaded": [name, ...], "started_at", "last_seen"}``: ``models`` are
the names its host has (``/api/tags``), ``loaded`` those in its memory (``/api/ps``), both
sorted; ``started_at`` and ``last_seen`` (its last heartbeat; 0 from an older worker) are
epoch seconds. From the API's view of the registry, at most a second old.

``GET /oshepherd/v1/workers/{id}``: one worker, or 404 ``worker_not_found`` in Ollama's shape.

``GET /oshepherd/v1/queues[?model=NAME]``: ``{"queues": [queue, ...]}``, one per model and
priority, each ``{"model", "priority": "high"|"normal"|"low", "depth", "oldest_wait"}``:
``depth`` is the number of jobs waiting (summed over tenants), ``oldest_wait`` the seconds the
oldest of them has waited (null when none waits). The models are those the live workers
hold, or the one ``model`` names (normalized; an invalid name is a 400). Sorted by model,
then priority from high to low. One Redis round trip (a pipeline: ``LLEN`` of each list and
``OLDEST_SCRIPT`` over them all), never a scan.

``GET /oshepherd/v1/throughput``: the fleet's requests and tokens per second over the last
``window`` (60) seconds, ``{"window", "requests_per_second", "prompt_tokens_per_second",
"completion_tokens_per_second", "models": [{"model", "requests_per_second", ...}, ...]}``
(models sorted). A request counts when it ends, with the tokens Ollama reported; every API
replica adds it to the bucket of its 10 s (``protocol.throughput_key``, written with the
usage, ``oshepherd.usage.record``), so every replica answers the same. One round trip: ``HGETALL``
of the 7 buckets the window touches, the oldest weighed by the part of it inside.

``GET /oshepherd/v1/fleet``: all three at once, ``{"workers", "queues", "throughput"}``, as
above (``oshepherd status`` and the dashboard read it).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from oshepherd.api.bodies import model_name
from oshepherd.api.errors import ApiError, RedisUnavailable, json_response
from oshepherd.api.gateway import Gateway, gateway
from oshepherd.models import entry_model, normalize
from oshepherd.protocol import (
    OLDEST_SCRIPT,
    PRIORITY_STEP,
    THROUGHPUT_BUCKET,
    WorkerEntry,
    model_queue,
    queue_key,
    throughput_key,
)

__all__ = ["queue_rows", "router", "throughput", "worker_view"]

router = APIRouter(prefix="/oshepherd/v1")
WINDOW = 60  # seconds over which throughput is measured
# A rate bucket's metrics (``oshepherd.usage``) -> the throughput's fields.
RATE_FIELDS = {
    "requests": "requests_per_second",
    "prompt": "prompt_tokens_per_second",
    "completion": "completion_tokens_per_second",
}


class WorkerNotFound(ApiError):
    def __init__(self, worker_id: str) -> None:
        super().__init__(404, f"worker '{worker_id}' not found", code="worker_not_found")


@router.get("/workers", response_model=None)
async def list_workers(request: Request) -> Response:
    return json_response({"workers": [worker_view(w) for w in _live(gateway(request))]})


@router.get("/workers/{worker_id}", response_model=None)
async def read_worker(request: Request, worker_id: str) -> Response:
    for entry in _live(gateway(request)):
        if entry.id == worker_id:
            return json_response(worker_view(entry))
    raise WorkerNotFound(worker_id)


@router.get("/queues", response_model=None)
async def list_queues(request: Request, model: str | None = None) -> Response:
    gw = gateway(request)
    if model is None:
        models = _held(_live(gw))
    else:
        models = [normalize(model_name({"model": model}, "model"))]
    try:
        rows = await queue_rows(gw, models)
    except RedisError as exc:
        raise RedisUnavailable(exc) from exc
    return json_response({"queues": rows})


@router.get("/throughput", response_model=None)
async def read_throughput(request: Request) -> Response:
    try:
        return json_response(await throughput(gateway(request)))
    except RedisError as exc:
        raise RedisUnavailable(exc) from exc


@router.get("/fleet", response_model=None)
async def read_fleet(request: Request) -> Response:
    gw = gateway(request)
    workers = _live(gw)
    try:
        queues = await queue_rows(gw, _held(workers))
        rates = await throughput(gw)
    except RedisError as exc:
        raise RedisUnavailable(exc) from exc
    views = [worker_view(w) for w in workers]
    return json_response({"workers": views, "queues": queues, "throughput": rates})


def worker_view(entry: WorkerEntry) -> dict[str, Any]:
    """A registry entry as the fleet API shows it (see the module)."""
    return {
        "id": entry.id,
        "hostname": entry.hostname,
        "ollama_url": entry.ollama_url,
        "version": entry.version,
        "healthy": entry.healthy,
        "error": entry.error,
        "slots": entry.slots,
        "in_flight": entry.in_flight,
        "models": sorted({entry_model(m) for m in entry.models}),
        "loaded": sorted({entry_model(m) for m in entry.running}),
        "started_at": entry.started_at,
        "last_seen": entry.last_seen,
    }


async def queue_rows(gw: Gateway, models: list[str]) -> list[dict[str, Any]]:
    """Depth and oldest wait of each of ``models`` (normalized) per priority, summed over
    the tenants ("" and ``Registry.tenants``); raises ``RedisError``."""
    tenants = sorted(gw.registry.tenants | {""})
    levels = sorted(PRIORITY_STEP.items(), key=lambda item: item[1])
    keys = [
        queue_key(model_queue(m, t), step) for m in models for _, step in levels for t in tenants
    ]
    if not keys:
        return []
    async with gw.redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.llen(key)
        pipe.eval(OLDEST_SCRIPT, len(keys), *keys)
        *depths, stamps = await pipe.execute()
    now = time.time()
    rows = []
    per_row = len(tenants)
    for n, (model, (level, _)) in enumerate((m, lv) for m in models for lv in levels):
        span = slice(n * per_row, (n + 1) * per_row)
        waits = [_waited(now, stamp) for stamp in stamps[span]]
        known = [w for w in waits if w is not None]
        rows.append(
            {
                "model": model,
                "priority": level,
                "depth": sum(depths[span]),
                "oldest_wait": round(max(known), 3) if known else None,
            }
        )
    return rows


async def throughput(gw: Gateway, now: float | None = None) -> dict[str, Any]:
    """The fleet's rates over the last ``WINDOW`` seconds before ``now`` (see the module);
    raises ``RedisError``."""
    now = time.time() if now is None else now
    last = int(now) // THROUGHPUT_BUCKET
    first = int(now - WINDOW) // THROUGHPUT_BUCKET
    async with gw.redis.pipeline(transaction=False) as pipe:
        for bucket in range(first, last + 1):
            pipe.hgetall(throughput_key(bucket))
        hashes = await pipe.execute()
    sums: dict[str, dict[str, float]] = {}
    for bucket, counts in zip(range(first, last + 1), hashes, strict=True):
        start = bucket * THROUGHPUT_BUCKET
        elapsed = min(start + THROUGHPUT_BUCKET, now) - start
        weight = (elapsed - max(now - WINDOW - start, 0.0)) / elapsed if elapsed > 0 else 0.0
        for name, value in counts.items():
            model, _, metric = name.decode().rpartition("|")
            if metric in RATE_FIELDS:
                per_model = sums.setdefault(model, dict.fromkeys(RATE_FIELDS.values(), 0.0))
                per_model[RATE_FIELDS[metric]] += weight * int(value)
    total = {field: sum(m[field] for m in sums.values()) for field in RATE_FIELDS.values()}
    models = [{"model": m, **_rates(sums[m])} for m in sorted(sums)]
    return {"window": WINDOW, **_rates(total), "models": models}


def _rates(counts: dict[str, float]) -> dict[str, float]:
    return {field: round(count / WINDOW, 3) for field, count in counts.items()}


def _held(workers: list[WorkerEntry]) -> list[str]:
    """The models (normalized) ``workers`` hold, sorted."""
    return sorted({entry_model(m) for w in workers for m in w.models})


def _waited(now: float, stamp: bytes | None) -> float | None:
    """Seconds since a job's ``queued`` stamp (negative: queued while no host had the model
    loaded, see ``Job.queued``); None for an empty list or an unstamped job."""
    if stamp is None:
        return None
    queued = abs(float(stamp))
    return max(now - queued, 0.0) if queued else None


def _live(gw: Gateway) -> list[WorkerEntry]:
    """The live workers, by id; ``RedisUnavailable`` when the registry is out of date."""
    registry = gw.registry
    if not registry.current:
        raise RedisUnavailable("the fleet's registry is out of date")
    now = time.time()
    return sorted((w for w in registry.workers.values() if w.expires > now), key=lambda w: w.id)
