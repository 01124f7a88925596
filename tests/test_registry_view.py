"""The registry's indexes and derived views: built once per refresh, current after each."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from oshepherd.api.registry import Registry
from oshepherd.protocol import WorkerEntry


def entry(worker_id: str, *models: str, healthy: bool = True) -> WorkerEntry:
    now = time.time()
    return WorkerEntry(
        id=worker_id, hostname=worker_id, ollama_url="http://h:11434", version="0.12.0",
        healthy=healthy, error="", models=[{"name": m, "model": m} for m in models],
        running=[], slots=1, in_flight=0, started_at=now, expires=now + 60,
    )  # fmt: skip


def registry(*entries: WorkerEntry) -> Registry:
    view = Registry(Redis(), refresh=1.0)  # never connects: no refresh in these tests
    view._install({e.id: e for e in entries})
    return view


def test_healthy_holders_and_healthy_come_from_the_refresh() -> None:
    a, b, c = entry("c", "m1:latest"), entry("b", "m1:latest", healthy=False), entry("a", "m1")
    view = registry(a, b, c)
    assert [w.id for w in view.healthy_holders("m1:latest")] == ["c", "a"]  # registry order
    assert [w.id for w in view.holders("m1:latest")] == ["c", "b", "a"]
    assert view.healthy_holders("m2:latest") == []
    healthy = view.healthy()
    assert [w.id for w in healthy] == ["a", "c"]
    healthy.clear()  # the caller's copy
    assert [w.id for w in view.healthy()] == ["a", "c"]


def test_a_derived_view_is_built_once_per_refresh() -> None:
    view = registry(entry("a", "m1:latest"))
    builds: list[int] = []

    def build() -> int:
        builds.append(len(view.healthy()))
        return len(builds)

    assert view.derived("n", build) == 1
    assert view.derived("n", build) == 1
    view._install({e.id: e for e in (entry("a", "m1:latest"), entry("b", "m2:latest"))})
    assert view.derived("n", build) == 2
    assert builds == [1, 2]
