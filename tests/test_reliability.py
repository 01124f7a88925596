"""When things go wrong: nothing hangs, nothing is lost, nothing runs twice."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import httpx
import psutil
import pytest
import redis

from oshepherd.protocol import PRIORITY_STEP, model_queue, queue_key, worker_key
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import Component, wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import WORKER_SETTINGS, tag_names

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

GENERATE = "/api/generate"


def stream_lines(url: str, body: dict[str, object], collected: list[dict[str, object]]) -> None:
    """Read a streamed generate to its end, appending every line."""
    with httpx.stream("POST", url + GENERATE, json=body, timeout=60) as response:
        for line in response.iter_lines():
            collected.append(json.loads(line))


def background(target: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def one_host(
    fleet: Fleet,
    *,
    api: dict[str, Any] | None = None,
    worker: dict[str, Any] | None = None,
    **host: Any,
) -> tuple[StandIn, Component]:
    """The usual scene: a host serving llama3 (with ``host`` options), its worker, the API."""
    standin = fleet.standin("llama3", **host)
    fleet.start_api(**(api or {}))
    component = fleet.worker(standin, **(worker or {}))
    fleet.wait_for_models("llama3:latest")
    return standin, component


def occupy(fleet: Fleet, host: StandIn) -> threading.Thread:
    """A job that keeps a slow host's one slot busy; the returned thread ends with it."""
    body = {"model": "llama3", "stream": False}
    thread = background(lambda: httpx.post(fleet.url + GENERATE, json=body, timeout=30))
    host.wait_for(lambda h: h.active == 1)
    return thread


def normal_list(model: str) -> str:
    """The Redis list where a job for ``model`` waits without keys (normal priority)."""
    return queue_key(model_queue(model), PRIORITY_STEP["normal"])


def queue_length(fleet: Fleet, model: str) -> int:
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        return int(client.llen(normal_list(model)))


def test_client_disconnect_stops_generation(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host, _ = one_host(fleet, tokens=1000, token_delay=0.01)
    with httpx.stream(
        "POST", fleet.url + GENERATE, json={"model": "llama3", "prompt": "x"}
    ) as response:
        lines = response.iter_lines()
        next(lines), next(lines)
    host.wait_for(lambda h: h.disconnects == 1, timeout=3)
    sent = host.tokens_sent
    host.wait_for(lambda h: h.active == 0, timeout=3)
    assert host.tokens_sent - sent <= 1 and host.tokens_sent < 1000


def test_a_queued_job_whose_client_left_never_runs(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host, _ = one_host(fleet, worker=dict(concurrency=1), latency=1.5)
    first = occupy(fleet, host)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while its job is queued
        httpx.post(fleet.url + GENERATE, json={"model": "llama3", "prompt": "gone"}, timeout=0.5)
    wait_until(lambda: queue_length(fleet, "llama3:latest") == 0, 5, "queued job withdrawn")
    first.join(10)
    host.wait_for(lambda h: h.active == 0 and h.completed == 1)
    assert [b.get("prompt") for _, p, b in host.requests if p == GENERATE] == [None]


def test_queue_deadline_gives_503_and_the_job_never_runs(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host, _ = one_host(fleet, api=dict(queue_timeout=0.5), worker=dict(concurrency=1), latency=3)
    first = occupy(fleet, host)
    late = httpx.post(fleet.url + GENERATE, json={"model": "llama3", "prompt": "late"}, timeout=10)
    assert late.status_code == 503
    assert late.headers["retry-after"] and "within 0.5s" in late.json()["error"]
    first.join(10)
    host.wait_for(lambda h: h.active == 0)
    assert queue_length(fleet, "llama3:latest") == 0
    assert all(b.get("prompt") != "late" for _, _, b in host.requests)


def test_without_queue_timeout_a_queued_job_waits_as_long_as_its_client(
    make_fleet: Callable[[], Fleet],
) -> None:
    """QUEUE_TIMEOUT unset, the default: a job queued behind a long generation is queued
    with no deadline and waits its turn, as in Ollama, which has no time limit."""
    fleet = make_fleet()
    host, _ = one_host(fleet, worker=dict(concurrency=1), latency=3)
    first = occupy(fleet, host)
    body = {"model": "llama3", "prompt": "late", "stream": False}
    answers: list[httpx.Response] = []
    late = background(
        lambda: answers.append(httpx.post(fleet.url + GENERATE, json=body, timeout=30))
    )
    wait_until(lambda: queue_length(fleet, "llama3:latest") == 1, 5, "second job queued")
    assert queued_deadlines(fleet, "llama3:latest") == [None]
    late.join(30)
    first.join(10)
    assert answers[0].status_code == 200 and answers[0].json()["done"] is True
    assert [b.get("prompt") for _, p, b in host.requests if p == GENERATE] == [None, "late"]


def queued_deadlines(fleet: Fleet, model: str) -> list[object]:
    """The ``deadline`` of every job waiting in ``model``'s queue (Celery messages)."""
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        messages = client.lrange(normal_list(model), 0, -1)
    return [json.loads(json.loads(m)["body"])[0][0]["deadline"] for m in messages]


def test_backpressure_fails_fast_past_the_queue_depth(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host, _ = one_host(fleet, api=dict(max_queue_depth=1), worker=dict(concurrency=1), latency=2)
    body = {"model": "llama3", "stream": False}
    running = background(lambda: httpx.post(fleet.url + GENERATE, json=body, timeout=30))
    host.wait_for(lambda h: h.active == 1)
    queued = background(lambda: httpx.post(fleet.url + GENERATE, json=body, timeout=30))
    wait_until(lambda: queue_length(fleet, "llama3:latest") == 1, 5, "one job queued")
    refused = httpx.post(fleet.url + GENERATE, json=body, timeout=5)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert "maximum pending requests exceeded" in refused.json()["error"]
    running.join(10)
    queued.join(10)
    host.wait_for(lambda h: h.completed == 2)


def test_workers_hold_no_job_beyond_their_slots(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host, _ = one_host(fleet, worker=dict(concurrency=2), latency=1.5)
    body = {"model": "llama3", "stream": False}
    threads = [
        background(lambda: httpx.post(fleet.url + GENERATE, json=body, timeout=30))
        for _ in range(5)
    ]
    host.wait_for(lambda h: h.active == 2)
    wait_until(lambda: queue_length(fleet, "llama3:latest") == 3, 5, "three jobs left in Redis")
    for thread in threads:
        thread.join(15)
    assert host.completed == 5 and host.peak_active == 2


def test_worker_death_reruns_unstarted_and_silent_jobs_elsewhere(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    doomed = fleet.standin("llama3", latency=2)
    spare = fleet.standin("llama3")
    fleet.start_api()
    victim = fleet.worker(doomed, concurrency=1)
    fleet.wait_for_models("llama3:latest")
    results: list[httpx.Response] = []
    body = {"model": "llama3", "prompt": "x", "stream": False}
    thread = background(
        lambda: results.append(httpx.post(fleet.url + GENERATE, json=body, timeout=30))
    )
    doomed.wait_for(lambda h: h.active == 1)  # started on the doomed host, nothing sent yet
    fleet.worker(spare, concurrency=1)
    victim.kill()
    thread.join(20)
    assert results and results[0].status_code == 200 and results[0].json()["done"] is True
    assert spare.count(GENERATE) == 1  # re-run once, elsewhere


def test_worker_death_mid_stream_ends_with_an_error_line(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host, victim = one_host(fleet, tokens=1000, token_delay=0.02)
    lines: list[dict[str, object]] = []
    thread = background(stream_lines, fleet.url, {"model": "llama3", "prompt": "x"}, lines)
    wait_until(lambda: len(lines) >= 3, 5, "stream started")
    victim.kill()
    thread.join(20)
    assert not thread.is_alive()
    assert "went away" in str(lines[-1].get("error"))
    tokens = [line["response"] for line in lines[:-1]]
    assert tokens == [f"tok{i} " for i in range(len(tokens))]  # no gap, no duplicate
    assert host.count(GENERATE) == 1  # never re-run once bytes had left


def test_ollama_down_stops_routing_and_recovers(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host, worker = one_host(fleet)
    host.stop()
    wait_until(lambda: "llama3:latest" not in tag_names(fleet.url), 5, "host dropped")
    refused = httpx.post(fleet.url + GENERATE, json={"model": "llama3", "stream": False}, timeout=5)
    assert refused.status_code == 503 and "no healthy worker" in refused.json()["error"]
    host.start()
    fleet.wait_for_models("llama3:latest", timeout=10)
    answer = httpx.post(fleet.url + GENERATE, json={"model": "llama3", "stream": False}, timeout=10)
    assert answer.status_code == 200 and worker.alive()


def test_sigterm_worker_finishes_in_flight_jobs_and_deregisters(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    _, worker = one_host(fleet, tokens=50, token_delay=0.03)
    lines: list[dict[str, object]] = []
    thread = background(stream_lines, fleet.url, {"model": "llama3", "prompt": "x"}, lines)
    wait_until(lambda: len(lines) >= 2, 5, "stream started")
    assert worker.stop(timeout=20) == 0
    thread.join(10)
    assert lines[-1]["done"] is True and len(lines) == 51
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        assert not client.exists(worker_key(worker.meta["id"]))


def test_sigterm_api_lets_in_flight_streams_finish(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    one_host(fleet, tokens=40, token_delay=0.03)
    api = fleet.api
    assert api is not None
    lines: list[dict[str, object]] = []
    thread = background(stream_lines, fleet.url, {"model": "llama3", "prompt": "x"}, lines)
    wait_until(lambda: len(lines) >= 2, 5, "stream started")
    # uvicorn re-raises SIGTERM once it has shut down gracefully.
    assert api.stop(timeout=20) in (0, -signal.SIGTERM)
    thread.join(10)
    assert lines[-1]["done"] is True and len(lines) == 41


@pytest.fixture
def private_redis(stack_log: IO[bytes]) -> Iterator[tuple[EmbeddedRedis, Fleet]]:
    """A fleet on a Redis of its own, which the test may stop and start again."""
    server = EmbeddedRedis().start()
    fleet = Fleet(server.url, stack_log, worker=WORKER_SETTINGS)
    yield server, fleet
    fleet.stop()
    server.close()


def test_redis_outage_fails_fast_then_heals_by_itself(
    private_redis: tuple[EmbeddedRedis, Fleet],
) -> None:
    server, fleet = private_redis
    host = fleet.standin("llama3")
    fleet.start_api()
    fleet.worker(host)
    fleet.wait_for_models("llama3:latest")
    body = {"model": "llama3", "prompt": "x", "stream": False}
    server.stop()
    during = httpx.post(fleet.url + GENERATE, json=body, timeout=10)
    assert during.status_code == 503 and during.headers["retry-after"]

    def listing_refused() -> bool:  # not an empty fleet: the registry is out of date
        tags = httpx.get(fleet.url + "/api/tags", timeout=5)
        return tags.status_code == 503 and "Redis" in tags.json()["error"]

    wait_until(listing_refused, 10, "/api/tags refused while Redis is gone")
    server.start()  # same port, empty: queues and registry rebuild from the workers

    def served() -> bool:
        return httpx.post(fleet.url + GENERATE, json=body, timeout=5).status_code == 200

    wait_until(served, 15, "served again after Redis came back")
    assert tag_names(fleet.url) == {"llama3:latest"}


def test_a_hung_redis_fails_requests_after_one_socket_timeout(
    private_redis: tuple[EmbeddedRedis, Fleet],
) -> None:
    """A Redis that stops answering (SIGSTOP) without closing its sockets: a request waits
    one socket timeout (5 s), not one per retry, then gets 503; all heals on SIGCONT."""
    server, fleet = private_redis
    one_host(fleet)
    body = {"model": "llama3", "prompt": "x", "stream": False}
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        during = httpx.post(fleet.url + GENERATE, json=body, timeout=30)
        waited = time.monotonic() - started
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert during.status_code == 503, during.text
    assert waited < 12, waited  # three socket timeouts (the retries) would be 15 s

    def served() -> bool:
        return httpx.post(fleet.url + GENERATE, json=body, timeout=10).status_code == 200

    wait_until(served, 20, "served again once Redis answers")


def test_nothing_leaks_once_idle(private_redis: tuple[EmbeddedRedis, Fleet]) -> None:
    server, fleet = private_redis
    host = fleet.standin("llama3")
    api = fleet.start_api(queue_timeout=0.3)
    fleet.worker(host, concurrency=2)
    fleet.wait_for_models("llama3:latest")
    process = psutil.Process(api.process.pid)
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        for round_ in range(2):
            host.tokens, host.token_delay = 5, 0.0
            for _ in range(150):
                client.post(GENERATE, json={"model": "llama3", "stream": False, "prompt": "x"})
            host.tokens, host.token_delay = 200, 0.005
            for _ in range(10):  # clients that hang up mid-stream
                with client.stream("POST", GENERATE, json={"model": "llama3", "prompt": "x"}) as r:
                    next(r.iter_lines())
            host.wait_for(lambda h: h.active == 0)
            if round_ == 0:
                baseline = process.memory_info().rss
    assert process.memory_info().rss - baseline < 16 * 1024 * 1024
    with redis.Redis.from_url(server.url) as client:
        wait_until(lambda: not client.pubsub_channels("oshepherd:job:*"), 5, "no job channels")
        assert client.pubsub_numpat() == 1  # the API process's one pattern subscription
        persistent = {k.decode() for k in client.scan_iter() if client.ttl(k) == -1}
    per_request = {k for k in persistent if k.startswith("oshepherd:") and k != "oshepherd:workers"}
    assert per_request == set()


def test_a_worker_that_cannot_reach_ollama_says_so_and_stops_taking_jobs(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    host = fleet.standin("llama3")
    fleet.start_api()
    worker = fleet.worker(host, heartbeat_interval=30)  # it will not notice by polling
    fleet.wait_for_models("llama3:latest")
    host.stop()
    body = {"model": "llama3", "stream": False}
    failed = httpx.post(fleet.url + GENERATE, json=body, timeout=10)
    assert failed.status_code == 502
    assert (
        failed.json()["error"]
        == f"worker {worker.meta['id']} cannot reach its Ollama at {host.url}"
    )
    refused = httpx.post(fleet.url + GENERATE, json=body, timeout=10)
    assert refused.status_code == 503 and "no healthy worker" in refused.json()["error"]


def test_a_job_lost_with_its_worker_before_it_started_runs_once_elsewhere(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    host, _ = one_host(fleet, worker=dict(concurrency=1), latency=1)
    busy = occupy(fleet, host)
    results: list[httpx.Response] = []
    body = {"model": "llama3", "prompt": "lost", "stream": False}
    thread = background(
        lambda: results.append(httpx.post(fleet.url + GENERATE, json=body, timeout=30))
    )
    wait_until(lambda: queue_length(fleet, "llama3:latest") == 1, 5, "job queued")
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        # A worker takes the job off the queue (as BRPOP does) and dies before starting it.
        stolen = client.rpop(normal_list("llama3:latest"))
        thread.join(20)
        assert results and results[0].status_code == 200
        # The dead worker's attempt, were it to start after all, is refused: the one slot
        # takes it before the next job, which proves it was skipped once that one is done.
        busy.join(10)
        client.lpush(normal_list("llama3:latest"), stolen)
    after = httpx.post(
        fleet.url + GENERATE,
        json={"model": "llama3", "prompt": "after", "stream": False},
        timeout=30,
    )
    assert after.status_code == 200
    prompts = [b.get("prompt") for _, p, b in host.requests if p == GENERATE]
    assert prompts.count("lost") == 1 and prompts[-1] == "after"
