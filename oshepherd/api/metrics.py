"""Prometheus metrics: this API process's own, and the fleet's, read from Redis at scrape time.

Two expositions, so that several API replicas never count a figure twice (docs/metrics.md):

* ``/metrics``, scraped on every replica: what this process saw (``REGISTRY``): requests by
  route, model and status, the time to first token, request duration and queue wait by
  model, the requests in flight, the requests Redis failed, and prometheus_client's process
  and GC figures. Summing over replicas counts each request once.
* ``/metrics/fleet``, scraped once (through the load balancer: any replica answers the
  same): the fleet's figures, the same from every replica, made by ``FleetCollector`` from a
  ``FleetSnapshot``: queue depths, workers, slots, loaded models, and the tokens and
  generation speed the workers count (``oshepherd.worker.stats``) and keep in Redis, since
  nothing can scrape them.

The hot path only calls ``Observe`` (the middleware) and ``note_*``, each a few
prometheus_client observations (about a microsecond each), no Redis round trip.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oshepherd.models import entry_model
from oshepherd.protocol import (
    PRIORITY_STEP,
    WorkerEntry,
    model_queue,
    queue_key,
    worker_stats_key,
)

__all__ = [
    "REGISTRY",
    "UNOBSERVED",
    "FleetCollector",
    "FleetSnapshot",
    "Observe",
    "exposition",
    "note_first_byte",
    "note_model",
    "note_redis_error",
    "note_started",
    "read_fleet",
]

prometheus_client.disable_created_metrics()  # no ``*_created`` series: half the exposition

# Paths not counted as requests: the probes and the scrapes themselves.
UNOBSERVED = frozenset({"/metrics", "/metrics/fleet", "/healthz", "/readyz"})
NO_RESPONSE = 499  # the status of a request that ended without an answer (client gone)
OTHER_ROUTE = "other"  # the route label of a path no route serves (bounded cardinality)

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

# Seconds. TTFT and queue wait run from a millisecond (a warm host) to minutes (a model
# loading, a busy fleet); a request lasts up to a long generation or a pull.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
REQUESTS = Counter(
    "oshepherd_requests",
    "HTTP requests this API process answered, by route (the path template, 'other' for an "
    "unknown path), model ('' when none was queued) and status (499: no answer sent)",
    ["route", "model", "status"],
    registry=REGISTRY,
)
TTFT = Histogram(
    "oshepherd_ttft_seconds",
    "Seconds from a request's arrival to the first byte of a successful answer relayed "
    "from a worker, by model",
    ["model"],
    buckets=_FAST,
    registry=REGISTRY,
)
DURATION = Histogram(
    "oshepherd_request_duration_seconds",
    "Seconds from a request's arrival to the end of its answer, by model ('' for routes "
    "that queue no model's job)",
    ["model"],
    buckets=_SLOW,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "oshepherd_queue_wait_seconds",
    "Seconds a job waited from being queued until its worker started it, by model",
    ["model"],
    buckets=_FAST,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "oshepherd_in_flight", "Requests this API process is answering now", registry=REGISTRY
)
REDIS_ERRORS = Counter(
    "oshepherd_redis_errors",
    "Requests this API process failed because Redis could not be reached (503)",
    registry=REGISTRY,
)


@dataclass(slots=True)
class _Exchange:
    """One request on its way: when it arrived (``time.perf_counter``), the model of its
    job, the status of its answer, whether its first byte was counted."""

    started: float
    model: str = ""
    status: int = NO_RESPONSE
    first_byte: bool = False


_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("oshepherd_exchange", default=None)


class Observe:
    """The ASGI middleware that counts each HTTP request (but ``UNOBSERVED``): in flight
    while it runs; at its end, its duration and its count by route, model and status.
    ``routes``: the paths of the app's routes, the labels of requests refused before
    routing (which sets ``scope["route"]`` otherwise)."""

    def __init__(self, app: ASGIApp, *, routes: Iterable[str]) -> None:
        self.app = app
        self._routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNOBSERVED:
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(time.perf_counter())
        token = _EXCHANGE.set(exchange)

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, observed)
        except Exception:
            if exchange.status == NO_RESPONSE:
                exchange.status = 500
            raise
        finally:
            IN_FLIGHT.dec()
            _EXCHANGE.reset(token)
            _child(DURATION, exchange.model).observe(time.perf_counter() - exchange.started)
            _child(REQUESTS, self._route(scope), exchange.model, str(exchange.status)).inc()

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", OTHER_ROUTE))
        return scope["path"] if scope["path"] in self._routes else OTHER_ROUTE


@functools.cache
def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: prometheus_client checks the labels and
    takes a lock on each call (a few us per request). As many entries as the metric has
    children: routes, statuses and the fleet's models."""
    return metric.labels(*labels)


def note_model(model: str) -> None:
    """The current request queued a job of ``model`` (normalized, one the fleet holds)."""
    exchange = _EXCHANGE.get()
    if exchange is not None:
        exchange.model = model


def note_started(model: str, waited: float) -> None:
    """A job of ``model`` started on a worker after ``waited`` seconds in its queue."""
    if _EXCHANGE.get() is not None:
        _child(QUEUE_WAIT, model).observe(waited)


def note_first_byte(status: int) -> None:
    """The relay sends the first byte of a worker's answer with ``status``: the request's
    time to first token, if it succeeded (once per request)."""
    exchange = _EXCHANGE.get()
    if exchange is None or exchange.first_byte or status >= 400:
        return
    exchange.first_byte = True
    _child(TTFT, exchange.model).observe(time.perf_counter() - exchange.started)


def note_redis_error() -> None:
    """A request fails because Redis could not be reached."""
    REDIS_ERRORS.inc()


def exposition(registry: CollectorRegistry) -> bytes:
    """``registry``'s metrics in Prometheus's text format (version 0.0.4)."""
    return prometheus_client.generate_latest(registry)


@dataclass
class FleetSnapshot:
    """The fleet at one moment: the live ``workers`` (registry entries), the ``depths`` of
    the queues by (model, priority level) summed over tenants, and each worker's ``stats``
    hash (``protocol.worker_stats_key``, fields decoded)."""

    workers: list[WorkerEntry] = field(default_factory=list)
    depths: dict[tuple[str, str], int] = field(default_factory=dict)
    stats: dict[str, dict[str, str]] = field(default_factory=dict)


async def read_fleet(
    redis: Redis, workers: Iterable[WorkerEntry], tenants: Iterable[str]
) -> FleetSnapshot:
    """The fleet's snapshot in one pipelined round trip: the LLEN of each priority's list of
    each tenant's queue (``tenants`` and "") of each model a worker holds, and every
    worker's stats hash. Raises ``RedisError``."""
    entries = sorted(workers, key=lambda w: w.id)
    models = sorted({entry_model(m) for w in entries for m in w.models})
    every = sorted({"", *tenants})
    queues = [(m, level, t) for m in models for level in PRIORITY_STEP for t in every]
    async with redis.pipeline(transaction=False) as pipe:
        for model, level, tenant in queues:
            pipe.llen(queue_key(model_queue(model, tenant), PRIORITY_STEP[level]))
        for entry in entries:
            pipe.hgetall(worker_stats_key(entry.id))
        replies = await pipe.execute()
    depths: dict[tuple[str, str], int] = {}
    for (model, level, _), depth in zip(queues, replies, strict=False):
        depths[model, level] = depths.get((model, level), 0) + int(depth)
    stats = {
        entry.id: {k.decode(): v.decode() for k, v in raw.items()}
        for entry, raw in zip(entries, replies[len(queues) :], strict=True)
    }
    return FleetSnapshot(entries, depths, stats)


class FleetCollector(Collector):
    """The fleet's metrics from one ``FleetSnapshot`` (see docs/metrics.md)."""

    def __init__(self, snapshot: FleetSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        depth = GaugeMetricFamily(
            "oshepherd_queue_depth",
            "Jobs waiting for a worker, by model and priority level (summed over tenants)",
            labels=["model", "priority"],
        )
        for (model, level), value in sorted(snap.depths.items()):
            depth.add_metric([model, level], value)
        workers = GaugeMetricFamily(
            "oshepherd_workers",
            "Live workers (registered), by state: healthy (its Ollama answers) or unhealthy",
            labels=["state"],
        )
        healthy = sum(1 for w in snap.workers if w.healthy)
        workers.add_metric(["healthy"], healthy)
        workers.add_metric(["unhealthy"], len(snap.workers) - healthy)
        yield depth
        yield workers
        yield from self._slots(snap.workers)
        yield from self._tokens(snap)

    def _slots(self, entries: list[WorkerEntry]) -> Iterator[Metric]:
        slots = GaugeMetricFamily(
            "oshepherd_worker_slots", "Jobs a worker runs at once", labels=["worker"]
        )
        busy = GaugeMetricFamily(
            "oshepherd_worker_slots_busy", "Jobs a worker is running now", labels=["worker"]
        )
        loaded = GaugeMetricFamily(
            "oshepherd_model_loaded",
            "1 when a worker's Ollama has the model in memory (its /api/ps), 0 when it only "
            "holds it (its /api/tags)",
            labels=["worker", "model"],
        )
        for entry in entries:
            slots.add_metric([entry.id], entry.slots)
            busy.add_metric([entry.id], entry.in_flight)
            running = {entry_model(m) for m in entry.running}
            for model in sorted({entry_model(m) for m in entry.models} | running):
                loaded.add_metric([entry.id, model], 1 if model in running else 0)
        yield from (slots, busy, loaded)

    def _tokens(self, snap: FleetSnapshot) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "oshepherd_tokens",
            "Tokens Ollama counted in a worker's jobs, by model, worker and kind (prompt or "
            "completion)",
            labels=["model", "worker", "kind"],
        )
        speed = GaugeMetricFamily(
            "oshepherd_generation_tokens_per_second",
            "Ollama's generation speed on a worker (eval_count / eval_duration) over the "
            "jobs of the model it finished in its latest heartbeat interval that had any",
            labels=["model", "worker"],
        )
        for worker, fields in sorted(snap.stats.items()):
            for name, value in sorted(fields.items()):
                model, _, kind = name.rpartition("|")
                if kind in ("prompt", "completion"):
                    tokens.add_metric([model, worker, kind], int(value))
                elif kind == "tps":
                    speed.add_metric([model, worker], float(value))
        yield tokens
        yield speed
