"""Prometheus metrics and the probes, on real processes: redis-server, two API replicas, two
workers, the stand-ins. Requests move the per-process counters and histograms of the
replica that answered them only; the fleet's figures (workers, slots, loaded models, queue
depth, the tokens the workers counted from the stand-in's answers) are the same from either
replica; /healthz and /readyz answer without a key and /readyz says 503 once Redis is gone;
/metrics needs an admin key or METRICS_TOKEN once keys exist."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import IO

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from oshepherd.keys import KeyStore
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import Component, wait_until
from oshepherd.testing.fleet import Fleet
from tests.conftest import two_hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MODEL = "llama3:latest"
TOKEN = "scrape-token-for-the-test"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(url: str, path: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of a scrape: (name, labels) -> value."""
    response = httpx.get(url + path, headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with two_hosts(
        redis_server, stack_log, ["llama3"], ["llama3"], worker_ids=("w-one", "w-two")
    ) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def second_api(fleet: Fleet) -> Component:
    # as a Kubernetes secret made from a file hands it over: with the file's newline
    return fleet.stack.start_api(metrics_token=TOKEN + "\n")


def generate(url: str, n: int, *, stream: bool) -> tuple[int, int]:
    """``n`` generate requests; the prompt and completion tokens the answers reported."""
    prompt = completion = 0
    for _ in range(n):
        body = {"model": "llama3", "prompt": "why is the sky blue", "stream": stream}
        response = httpx.post(url + "/api/generate", json=body, timeout=10)
        assert response.status_code == 200
        last = json.loads(response.text.strip().splitlines()[-1])  # the final chunk
        prompt += last["prompt_eval_count"]
        completion += last["eval_count"]
    return prompt, completion


def test_each_replica_counts_its_own_requests_and_both_show_the_same_fleet(
    fleet: Fleet, second_api: Component
) -> None:
    first, second = fleet.url, second_api.url
    before = [samples(u, "/metrics") for u in (first, second)]
    fleet_before = samples(first, "/metrics/fleet")
    p1, c1 = generate(first, 3, stream=True)
    p2, c2 = generate(second, 2, stream=False)
    assert httpx.post(first + "/api/generate", json={"model": "nope"}).status_code == 404

    ok = {"route": "/api/generate", "model": "llama3:latest", "status": "200"}
    after = [samples(u, "/metrics") for u in (first, second)]
    for found, was, n in zip(after, before, (3, 2), strict=True):
        assert (
            value(found, "oshepherd_requests_total", **ok)
            - value(was, "oshepherd_requests_total", **ok)
            == n
        )
        for histogram in ("ttft", "request_duration", "queue_wait"):
            name = f"oshepherd_{histogram}_seconds_count"
            assert value(found, name, model=MODEL) - value(was, name, model=MODEL) == n
        assert value(found, "oshepherd_ttft_seconds_sum", model=MODEL) > 0
        assert value(found, "oshepherd_in_flight") == 0
    missing = {"route": "/api/generate", "model": "", "status": "404"}
    assert value(after[0], "oshepherd_requests_total", **missing) >= 1
    assert value(after[1], "oshepherd_requests_total", **missing) == 0

    def tokens(url: str) -> tuple[float, float]:
        found = samples(url, "/metrics/fleet")
        kinds = ("prompt", "completion")
        return tuple(  # type: ignore[return-value]
            total(found, "oshepherd_tokens_total", model=MODEL, kind=k)
            - total(fleet_before, "oshepherd_tokens_total", model=MODEL, kind=k)
            for k in kinds
        )

    # The workers write their counts with their next heartbeat (0.5 s here).
    wait_until(lambda: tokens(first) == (p1 + p2, c1 + c2), 10, "the tokens in /metrics/fleet")
    assert tokens(second) == tokens(first)
    found = samples(second, "/metrics/fleet")
    assert value(found, "oshepherd_workers", state="healthy") == 2
    assert value(found, "oshepherd_workers", state="unhealthy") == 0
    for worker in ("w-one", "w-two"):
        assert value(found, "oshepherd_worker_slots", worker=worker) == 4
        assert ("oshepherd_worker_slots_busy", frozenset({("worker", worker)})) in found
        assert ("oshepherd_model_loaded", frozenset({("worker", worker), ("model", MODEL)})) in (
            found
        )
    speeds = [v for (n, _), v in found.items() if n == "oshepherd_generation_tokens_per_second"]
    assert speeds and all(s > 0 for s in speeds)
    for level in ("high", "normal", "low"):
        assert value(found, "oshepherd_queue_depth", model=MODEL, priority=level) == 0


def test_the_probes_answer_and_readyz_fails_without_redis(stack_log: IO[bytes]) -> None:
    server = EmbeddedRedis().start()
    fleet = Fleet(server.url, stack_log)
    try:
        api = fleet.start_api(registry_refresh=0.2)
        wait_until(lambda: httpx.get(api.url + "/readyz").status_code == 200, 10, "ready")
        body = httpx.get(api.url + "/readyz").json()
        assert body == {"status": "ready", "redis": True, "registry": True}
        assert httpx.head(api.url + "/healthz").status_code == 200
        server.stop()
        wait_until(lambda: httpx.get(api.url + "/readyz").status_code == 503, 10, "unready")
        assert httpx.get(api.url + "/readyz").json()["redis"] is False
        assert httpx.get(api.url + "/healthz").json() == {"status": "ok"}
        gone = lambda: httpx.get(api.url + "/metrics/fleet").status_code == 503  # noqa: E731
        wait_until(gone, 10, "no fleet figures once the registry is out of date")
        found = samples(api.url, "/metrics")
        assert value(found, "oshepherd_redis_errors_total") >= 1
    finally:
        fleet.stop()
        server.close()


def test_metrics_need_an_admin_key_or_the_token_once_keys_exist(
    fleet: Fleet, second_api: Component
) -> None:
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        store = KeyStore(client)
        admin, admin_key = store.create({"name": "metrics-admin", "scope": "admin"})
        user, user_key = store.create({"name": "metrics-user"})
        try:
            url = second_api.url
            keys_on = [f"{api}/metrics" for api in (url, fleet.url)]  # each replica on its own
            for scrape_url in keys_on:
                wait_until(partial(_refused, scrape_url), 10, f"keys on at {scrape_url}")
            for path in ("/metrics", "/metrics/fleet"):
                assert httpx.get(url + path).status_code == 401
                bearer = {"Authorization": f"Bearer {admin}"}
                assert httpx.get(url + path, headers=bearer).status_code == 200
                assert httpx.get(url + path, headers={"x-api-key": admin}).status_code == 200
                bearer = {"Authorization": f"Bearer {user}"}
                assert httpx.get(url + path, headers=bearer).status_code == 403
                bearer = {"Authorization": f"Bearer {TOKEN}"}
                assert httpx.get(url + path, headers=bearer).status_code == 200
                # the token opens the scrapes only, and only on the replica that has it
                assert httpx.get(fleet.url + path, headers=bearer).status_code == 401
            assert httpx.get(url + "/api/tags", headers=bearer).status_code == 401
            for probe in ("/healthz", "/readyz"):
                assert httpx.get(url + probe).status_code == 200
            # A request refused before routing counts under its route, not "other".
            assert httpx.post(url + "/api/generate", json={}).status_code == 401
            scrape = samples(url, "/metrics", {"x-api-key": admin})
            refused = {"route": "/api/generate", "status": "401"}
            assert total(scrape, "oshepherd_requests_total", **refused) >= 1
        finally:
            store.revoke(admin_key.id)
            store.revoke(user_key.id)


def _refused(url: str) -> bool:
    """Whether ``url`` answers 401: that API process has loaded a key table with keys."""
    return httpx.get(url).status_code == 401
