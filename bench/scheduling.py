"""Figures fair and warm: scheduling among tenants and among warm and cold hosts.

fair. One worker with one slot, jobs of ``JOB`` seconds. Tenant A queues 200 jobs while the
     slot is busy, then tenant B queues one: how many job durations B's job waits. Direct:
     the same burst with both on one queue (no fair share: B waits behind all of A's).
     Jobs are queued as the API queues them (``ENQUEUE_SCRIPT`` on their tenant's list).
warm. Two hosts hold the model: one has it loaded, the other would load it first
     (``LOAD`` seconds, the stand-in's load time). Two clients send requests of ``SERVICE``
     seconds through the API, so the warm host's one slot is often busy: latency p50 and
     max, and how many requests paid a load, with WARM_WAIT 0.3 s (gateway) and 0 (direct:
     no preference, the first free host takes the job).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import redis

from bench.fleet import Lab
from bench.harness import Profile, percentile
from bench.report import Row, Target
from oshepherd.protocol import (
    TENANTS,
)
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn

__all__ = ["fair_share", "warm_first"]

MODEL = "sched:latest"
JOB = 0.02  # seconds per job (fair)
BURST = 200
SERVICE, LOAD = 0.15, 1.0  # seconds (warm)
GENERATE = "/api/generate"


def fair_share(lab: Lab, profile: Profile) -> list[Row]:
    """fair: B's wait, in job durations, with fair share (gateway) and one queue (direct)."""
    waits = {fair: _b_wait(lab, fair) for fair in (False, True)}
    note = f"{BURST} jobs of A queued while the one slot is busy, then B's one; {JOB}s per job"
    return [
        Row(
            "fair",
            "B's wait after A's burst",
            "jobs",
            waits[False],
            waits[True],
            "value",
            Target("<=", 2.5, on="gateway"),
            notes=[note],
        )
    ]


def _b_wait(lab: Lab, fair: bool) -> float:
    """Seconds from B's job queued to its end, over ``JOB``, minus its own duration."""
    tenants = ("tenant-a", "tenant-b") if fair else ("", "")
    with lab.fleet() as fleet:
        with redis.Redis.from_url(fleet.stack.redis_url) as client:
            client.sadd(TENANTS, "tenant-a", "tenant-b")
        host = fleet.standin(MODEL, latency=JOB)
        fleet.start_api()
        fleet.worker(host, concurrency=1)
        fleet.wait_for_models(MODEL)
        for tenant in tenants:  # the worker follows both tenants' queues
            fleet.enqueue_generates(MODEL, ["probe"], tenant=tenant)
        host.wait_for(lambda h: h.completed == len(tenants), timeout=10)
        fleet.enqueue_generates(MODEL, ["a-busy"], tenant=tenants[0])
        host.wait_for(lambda h: h.active == 1)
        fleet.enqueue_generates(MODEL, [f"a-{i}" for i in range(BURST - 1)], tenant=tenants[0])
        queued = time.monotonic()
        fleet.enqueue_generates(MODEL, ["b"], tenant=tenants[1])
        wait_until(lambda: "b" in _prompts(host), 60, "B's job ran")
        return round((time.monotonic() - queued) / JOB - 1, 1)


def _prompts(host: StandIn) -> list[str]:
    return [str(b.get("prompt")) for _, p, b in host.requests if p == GENERATE]


def warm_first(lab: Lab, profile: Profile) -> list[Row]:
    """warm: latency with WARM_WAIT 0.3 s (gateway) and 0 (direct), and the loads paid."""
    runs = {wait: _warm_run(lab, wait, profile.latency_requests // 100 or 10) for wait in (0, 0.3)}
    rows = []
    for label, pick in (("p50", 50.0), ("max", 100.0)):
        direct, gateway = (percentile(runs[w][0], pick) * 1e3 for w in (0, 0.3))
        rows.append(Row("warm", f"latency {label}", "ms", direct, gateway, "value"))
    rows.append(
        Row(
            "warm",
            "requests that paid a load",
            "",
            runs[0][1],
            runs[0.3][1],
            "value",
            notes=[
                f"2 clients; warm host 1 slot, {SERVICE}s per request; cold host loads in "
                f"{LOAD}s; direct = WARM_WAIT 0 (no preference), gateway = WARM_WAIT 0.3"
            ],
        )
    )
    return rows


def _warm_run(lab: Lab, warm_wait: float, per_client: int) -> tuple[list[float], int]:
    """Latencies (s) of 2 clients × ``per_client`` requests, and how many hit the cold host
    before it had loaded the model."""
    with lab.fleet() as fleet:
        warm = fleet.standin(MODEL, latency=SERVICE)
        cold = fleet.standin(MODEL, latency=SERVICE, load_time=LOAD)
        httpx.post(warm.url + GENERATE, json={"model": MODEL}).raise_for_status()  # a load
        fleet.start_api()
        for host, name in ((warm, "warm"), (cold, "cold")):
            fleet.worker(host, concurrency=1, worker_id=name, warm_wait=warm_wait)
        fleet.wait_for_models(MODEL, workers=2)
        wait_until(lambda: _loaded_on(fleet) == ["warm"], 10, "the warm host seen loaded")
        latencies: list[float] = []
        clients = [threading.Thread(target=_client, args=(fleet, per_client, latencies.append))]
        clients.append(threading.Thread(target=_client, args=(fleet, per_client, latencies.append)))
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        loads = 1 if any(b.get("prompt") for _, p, b in cold.requests if p == GENERATE) else 0
        return latencies, loads


def _client(fleet: Fleet, n: int, record: Callable[[float], None]) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        for _ in range(n):
            started = time.monotonic()
            client.post(GENERATE, json=body).raise_for_status()
            record(time.monotonic() - started)


def _loaded_on(fleet: Fleet) -> list[str]:
    models = httpx.get(fleet.url + "/api/ps", timeout=5).json()["models"]
    return sorted(w for m in models if m["name"] == MODEL for w in m["workers"])
