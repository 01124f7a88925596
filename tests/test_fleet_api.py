"""The fleet API (/oshepherd/v1/workers, /queues) on a real fleet: two workers, one of them
with a single slot whose model's queue fills while the slot is busy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import httpx
import pytest

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import busy_and_other

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

WORKER_FIELDS = {
    "id", "hostname", "ollama_url", "version", "healthy", "error", "slots", "in_flight",
    "models", "loaded", "started_at", "last_seen",
}  # fmt: skip


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with busy_and_other(redis_server, stack_log) as fleet:
        yield fleet


def get(fleet: Fleet, path: str, **params: str) -> httpx.Response:
    return httpx.get(fleet.url + path, params=params, timeout=5)


def test_workers_list_every_live_worker_with_its_models(fleet: Fleet) -> None:
    workers = get(fleet, "/oshepherd/v1/workers").json()["workers"]
    assert [w["id"] for w in workers] == ["busy", "other"]
    busy, other = workers
    assert set(busy) == WORKER_FIELDS
    assert busy["models"] == ["llama3:latest"] and other["models"] == ["qwen2:7b"]
    assert busy["slots"] == 1 and other["slots"] == 4
    assert busy["healthy"] is True and busy["error"] == "" and busy["version"] == "0.12.0"
    assert busy["ollama_url"] == fleet.standins[0].url
    assert 0 < busy["started_at"] <= busy["last_seen"] <= time.time() + 1
    assert get(fleet, "/oshepherd/v1/workers/other").json() == other


def test_an_unknown_worker_is_a_404_in_ollamas_shape(fleet: Fleet) -> None:
    answer = get(fleet, "/oshepherd/v1/workers/nobody")
    assert answer.status_code == 404
    assert answer.json() == {"error": "worker 'nobody' not found", "code": "worker_not_found"}


@pytest.mark.parametrize("bad", ["", " llama3", "x" * 600, "ll\x01ama"])
def test_a_bad_model_filter_is_a_400(fleet: Fleet, bad: str) -> None:
    answer = get(fleet, "/oshepherd/v1/queues", model=bad)
    assert answer.status_code == 400 and "error" in answer.json()


def test_queues_rise_while_the_one_slot_is_busy_and_fall(fleet: Fleet) -> None:
    answers: list[int] = []

    def generate(priority: str = "normal") -> threading.Thread:
        def run() -> None:
            body = {"model": "llama3", "prompt": "hi", "stream": False}
            headers = {"X-Oshepherd-Priority": priority}
            url = fleet.url + "/api/generate"
            answers.append(httpx.post(url, json=body, headers=headers, timeout=30).status_code)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    host: StandIn = fleet.standins[0]
    threads = [generate()]
    host.wait_for(lambda h: h.active == 1)
    threads += [generate(), generate(), generate("high")]

    def llama3() -> dict[str, dict[str, Any]]:
        rows = get(fleet, "/oshepherd/v1/queues", model="llama3").json()["queues"]
        return {row["priority"]: row for row in rows}

    wait_until(
        lambda: llama3()["normal"]["depth"] == 2 and llama3()["high"]["depth"] == 1, 5, "queued"
    )
    rows = llama3()
    assert list(rows) == ["high", "normal", "low"]
    assert rows["low"] == {"model": "llama3:latest", "priority": "low", "depth": 0,
                           "oldest_wait": None}  # fmt: skip
    assert 0 < rows["normal"]["oldest_wait"] < 5
    everything = get(fleet, "/oshepherd/v1/queues").json()["queues"]
    assert [(r["model"], r["priority"]) for r in everything] == [
        (model, level) for model in ("llama3:latest", "qwen2:7b") for level in rows
    ]

    def busy() -> dict[str, Any]:
        return dict(get(fleet, "/oshepherd/v1/workers/busy").json())

    wait_until(lambda: busy()["in_flight"] == 1, 3, "in flight seen in the registry")
    assert busy()["loaded"] == ["llama3:latest"]
    wait_until(lambda: all(row["depth"] == 0 for row in llama3().values()), 10, "emptied")
    for thread in threads:
        thread.join(10)
    assert answers == [200] * 4


def test_throughput_counts_the_last_minutes_requests_and_tokens(fleet: Fleet) -> None:
    def qwen2() -> dict[str, Any]:
        rates = get(fleet, "/oshepherd/v1/throughput").json()
        return next((m for m in rates["models"] if m["model"] == "qwen2:7b"), {})

    before = qwen2().get("requests_per_second", 0.0)
    for _ in range(3):
        body = {"model": "qwen2:7b", "prompt": "hi", "stream": False}
        assert httpx.post(fleet.url + "/api/generate", json=body, timeout=10).status_code == 200
    wanted = round(before + 3 / 60, 3)
    wait_until(lambda: qwen2().get("requests_per_second") == wanted, 5, "3 requests counted")
    assert qwen2()["completion_tokens_per_second"] > 0
    rates = get(fleet, "/oshepherd/v1/throughput").json()
    assert rates["window"] == 60 and rates["requests_per_second"] >= wanted
    assert set(rates) == {"window", "requests_per_second", "prompt_tokens_per_second",
                          "completion_tokens_per_second", "models"}  # fmt: skip


def test_the_fleet_summary_has_workers_queues_and_throughput(fleet: Fleet) -> None:
    summary = get(fleet, "/oshepherd/v1/fleet").json()
    assert set(summary) == {"workers", "queues", "throughput"}
    assert [w["id"] for w in summary["workers"]] == ["busy", "other"]
    assert {q["model"] for q in summary["queues"]} == {"llama3:latest", "qwen2:7b"}
    assert summary["throughput"]["window"] == 60
