"""Scheduling on real workers: priorities, fair share among tenants, warm hosts first.

Jobs are queued as the API queues them (``ENQUEUE_SCRIPT`` with ``celery_message``, on the
list of their tenant and priority); the order a host receives them in is the order its
worker took them. Every wait is on a condition, with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from oshepherd.protocol import (
    PRIORITY_STEP,
    TENANTS,
    model_queue,
    queue_key,
)
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MODEL = "llama3:latest"
GENERATE = "/api/generate"


def enqueue(fleet: Fleet, *prompts: str, tenant: str = "", level: str = "normal") -> None:
    """Queue a generate of each of ``prompts`` as the API does (no one follows their
    answers)."""
    assert -1 not in fleet.enqueue_generates(MODEL, prompts, tenant=tenant, level=level)


def prompts(host: StandIn) -> list[str]:
    """The prompts of the generates ``host`` received, in order (not the loads)."""
    return [str(b["prompt"]) for _, p, b in host.requests if p == GENERATE and b.get("prompt")]


def one_slot(fleet: Fleet, **host: float) -> StandIn:
    """A host serving llama3 behind a worker with one slot, and the API."""
    standin = fleet.standin("llama3", **host)
    fleet.start_api()
    fleet.worker(standin, concurrency=1)
    fleet.wait_for_models(MODEL)
    return standin


def test_a_high_priority_job_queued_last_runs_first(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host = one_slot(fleet, latency=0.2)
    enqueue(fleet, "busy")
    host.wait_for(lambda h: h.active == 1)
    for level in ("low", "low", "normal", "low", "high"):
        enqueue(fleet, level, level=level)
    host.wait_for(lambda h: h.completed == 6, timeout=10)
    assert prompts(host) == ["busy", "high", "normal", "low", "low", "low"]


def test_one_tenant_s_burst_does_not_hold_back_another_s_job(
    make_fleet: Callable[[], Fleet],
) -> None:
    """One slot busy, tenant A queues 200 jobs, then tenant B one: B's starts after at
    most one more of A's (round robin among the tenants' queues)."""
    fleet = make_fleet()
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        client.sadd(TENANTS, "tenant-a", "tenant-b")  # as `oshepherd keys create` does
    host = one_slot(fleet, latency=0.05)
    for tenant in ("tenant-a", "tenant-b"):  # the worker follows both tenants' queues
        enqueue(fleet, f"probe-{tenant}", tenant=tenant)
    host.wait_for(lambda h: h.completed == 2, timeout=10)
    host.reset_counters()
    enqueue(fleet, "a-busy", tenant="tenant-a")
    host.wait_for(lambda h: h.active == 1)
    enqueue(fleet, *(f"a-{i}" for i in range(199)), tenant="tenant-a")
    enqueue(fleet, "b", tenant="tenant-b")
    wait_until(lambda: "b" in prompts(host), 10, "B's job ran")
    order = prompts(host)
    assert order.index("b") <= 2, order[:5]  # after "a-busy" and at most one more of A's


def test_jobs_go_to_the_warm_host_and_to_a_cold_one_after_warm_wait(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    warm = fleet.standin("llama3")
    cold = fleet.standin("llama3", load_time=0.5)
    httpx.post(warm.url + GENERATE, json={"model": MODEL}).raise_for_status()  # a load
    fleet.start_api()
    fleet.worker(warm, concurrency=1, worker_id="warm")
    fleet.worker(cold, concurrency=1, worker_id="cold")
    fleet.wait_for_models(MODEL, workers=2)
    wait_until(lambda: running_on(fleet) == ["warm"], 10, "the API sees llama3 loaded on warm")
    for i in range(3):
        answer = httpx.post(fleet.url + GENERATE, json={"model": "llama3", "prompt": f"w{i}"})
        assert answer.status_code == 200
    assert prompts(warm) == ["w0", "w1", "w2"] and prompts(cold) == []

    warm.latency = 3.0  # the warm host's one slot stays busy past WARM_WAIT
    busy = threading.Thread(target=generate, args=(fleet, "busy"), daemon=True)
    busy.start()
    warm.wait_for(lambda h: h.active == 1)
    started = time.monotonic()
    assert generate(fleet, "late") == 200
    took = time.monotonic() - started
    assert prompts(cold) == ["late"] and "late" not in prompts(warm)
    assert 0.3 + 0.5 <= took < 2.5  # WARM_WAIT, then the cold host's load
    busy.join(10)


def generate(fleet: Fleet, prompt: str) -> int:
    body = {"model": "llama3", "prompt": prompt, "stream": False}
    return httpx.post(fleet.url + GENERATE, json=body, timeout=20).status_code


def running_on(fleet: Fleet) -> list[str]:
    """The workers the API lists llama3 as loaded on (its /api/ps)."""
    models = httpx.get(fleet.url + "/api/ps", timeout=5).json()["models"]
    return sorted(w for m in models if m["name"] == MODEL for w in m["workers"])


def test_x_oshepherd_priority_orders_requests_through_the_api(
    make_fleet: Callable[[], Fleet],
) -> None:
    """The header, end to end: two low requests wait, a high one sent after them runs first."""
    fleet = make_fleet()
    host = one_slot(fleet, latency=0.3)
    low = queue_key(model_queue(MODEL), PRIORITY_STEP["low"])
    sent: list[threading.Thread] = []

    def send(prompt: str, level: str) -> None:
        body = {"model": "llama3", "prompt": prompt, "stream": False}
        headers = {"X-Oshepherd-Priority": level}
        thread = threading.Thread(
            target=lambda: httpx.post(fleet.url + GENERATE, json=body, headers=headers, timeout=20),
            daemon=True,
        )
        thread.start()
        sent.append(thread)

    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        send("busy", "normal")
        host.wait_for(lambda h: h.active == 1)

        def queued(n: int) -> Callable[[], bool]:
            return lambda: bool(client.llen(low) == n)

        for n, prompt in enumerate(("low-1", "low-2"), start=1):
            send(prompt, "low")
            wait_until(queued(n), 5, f"{prompt} queued")
        send("high", "high")
        host.wait_for(lambda h: h.completed == 4, timeout=10)
    for thread in sent:
        thread.join(10)
    assert prompts(host) == ["busy", "high", "low-1", "low-2"]
