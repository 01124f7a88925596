"""``GET /api/status`` and ``HEAD /api/tags``, answered as Ollama answers them
(server/routes.go: ``StatusHandler``, ``r.HEAD("/api/tags", s.ListHandler)``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import IO, Any

import httpx
import pytest

from oshepherd.api.routes.ollama import fleet_cloud
from oshepherd.protocol import WorkerEntry
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from oshepherd.worker.ollama import HostState, OllamaHost
from tests.conftest import two_hosts


def entry(cloud: dict[str, Any]) -> WorkerEntry:
    return WorkerEntry("w", "h", "http://h", "0.33.0", True, "", [], [], 1, 0, 0.0, 0.0, cloud)


@pytest.mark.parametrize(
    ("clouds", "expected"),
    [
        ([], {"disabled": False, "source": "none"}),
        ([{}, {"disabled": False, "source": "none"}], {"disabled": False, "source": "none"}),
        ([{"disabled": True, "source": "env"}, {}], {"disabled": True, "source": "env"}),
        (
            [{"disabled": True, "source": "env"}, {"disabled": True, "source": "config"}],
            {"disabled": True, "source": "both"},
        ),
        (
            [{"disabled": True, "source": "config"}, {"disabled": True, "source": "config"}],
            {"disabled": True, "source": "config"},
        ),
    ],
)
def test_the_fleet_disables_cloud_when_any_host_does(
    clouds: list[dict[str, Any]], expected: dict[str, Any]
) -> None:
    assert fleet_cloud(entry(cloud) for cloud in clouds) == expected


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with two_hosts(redis_server, stack_log, ["llama3"], ["qwen3"]) as fleet:
        yield fleet


def cloud(url: str) -> Any:
    response = httpx.get(url + "/api/status", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


@pytest.mark.slow
def test_status_is_ollamas_shape_and_follows_the_hosts_policies(fleet: Fleet) -> None:
    first, second = fleet.standins
    assert cloud(fleet.url) == cloud(first.url) == {"cloud": {"disabled": False, "source": "none"}}
    try:
        first.cloud_source = "env"
        wait_until(lambda: cloud(fleet.url) == cloud(first.url), 10, "one host disables cloud")
        assert cloud(fleet.url) == {"cloud": {"disabled": True, "source": "env"}}
        second.cloud_source = "config"
        expected = {"cloud": {"disabled": True, "source": "both"}}
        wait_until(lambda: cloud(fleet.url) == expected, 10, "both hosts disable cloud")
    finally:
        first.cloud_source = second.cloud_source = "none"
    wait_until(lambda: not cloud(fleet.url)["cloud"]["disabled"], 10, "cloud enabled again")


@pytest.mark.slow
def test_head_tags_answers_gets_headers_without_a_body(fleet: Fleet) -> None:
    got = httpx.get(fleet.url + "/api/tags", timeout=5)
    head = httpx.head(fleet.url + "/api/tags", timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == str(len(got.content))


async def poll(url: str) -> HostState:
    host = OllamaHost(url)
    try:
        return await host.poll()
    finally:
        await host.session.close()


@pytest.mark.slow
def test_a_host_without_status_stays_healthy_and_reports_no_policy() -> None:
    with StandIn(["llama3"]) as host:
        host.cloud_source = None  # an Ollama older than /api/status: 404
        state = asyncio.run(poll(host.url))
        assert state.healthy and state.models and state.cloud == {}
        host.cloud_source = "env"
        assert asyncio.run(poll(host.url)).cloud == {"disabled": True, "source": "env"}
