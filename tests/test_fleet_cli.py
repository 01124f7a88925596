"""``oshepherd status`` and ``oshepherd pull`` as processes against a real fleet (and against
nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import IO

import httpx
import pytest
import redis

from oshepherd.keys import KeyStore
from oshepherd.redis_server import EmbeddedRedis, free_port
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from tests.conftest import two_hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    """Two hosts (alpha: llama3, beta: qwen2), a worker each, one API."""
    with two_hosts(
        redis_server, stack_log, ["llama3"], ["qwen2:7b"], worker_ids=("alpha", "beta")
    ) as fleet:
        yield fleet


def oshepherd(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_API_KEY", "OSHEPHERD_URL")}
    if key is not None:
        env["OLLAMA_API_KEY"] = key
    command = [sys.executable, "-m", "oshepherd", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


def test_status_json_is_the_fleet_api(fleet: Fleet) -> None:
    result = oshepherd("status", "--json", "--url", fleet.url)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"workers", "queues", "throughput"}
    assert [w["id"] for w in printed["workers"]] == ["alpha", "beta"]
    assert printed["workers"][0]["models"] == ["llama3:latest"]


def test_status_prints_tables_of_workers_queues_and_throughput(fleet: Fleet) -> None:
    result = oshepherd("status", "--url", fleet.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"2 worker(s) at {fleet.url}" in out and "queues" in out and "throughput" in out
    alpha = next(line for line in out.splitlines() if "alpha" in line)
    assert "llama3:latest" in alpha and "ok" in alpha and "0/4" in alpha
    assert any("qwen2:7b" in line for line in out.splitlines() if "beta" not in line)


def test_status_against_nothing_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["status", "--json"], ["pull", "llama3"]):
        result = oshepherd(*args, "--url", url)
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: cannot reach the gateway at {url}")


@pytest.mark.parametrize("url", ["http://[::1", "http://gateway:port", "http://a\nb"])
def test_a_malformed_url_is_one_line_and_exit_1(url: str) -> None:
    for args in (["status"], ["pull", "llama3"]):
        result = oshepherd(*args, "--url", url)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: invalid gateway URL {url!r}")


def test_status_of_something_else_says_so(fleet: Fleet) -> None:
    ollama_host = fleet.standins[0].url
    result = oshepherd("status", "--url", ollama_host)
    assert result.returncode == 1
    said = f"Error: {ollama_host} has no fleet API: is it an oshepherd gateway?"
    assert result.stderr.strip() == said


def test_status_needs_an_admin_key_once_keys_exist(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    fleet.start_api()
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        store = KeyStore(client)
        user, _ = store.create({"name": "user", "scope": "user"})
        admin, _ = store.create({"name": "admin", "scope": "admin"})
    wait_until(lambda: httpx.get(fleet.url + "/api/tags").status_code == 401, 5, "keys on")
    refused = httpx.get(fleet.url + "/oshepherd/v1/fleet", headers={"X-Request-Id": "r-401"})
    assert (refused.status_code, refused.headers["x-request-id"]) == (401, "r-401")
    result = oshepherd("status", "--url", fleet.url)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {fleet.url} refused the key (401): ")
    result = oshepherd("status", "--url", fleet.url, key=user)
    assert result.returncode == 1
    said = f"Error: {fleet.url} refused the key (403): this route needs an admin API key"
    assert result.stderr.strip() == said
    result = oshepherd("status", "--json", "--url", fleet.url, key=admin)
    assert result.returncode == 0 and json.loads(result.stdout)["workers"] == []


def test_pull_draws_a_bar_per_host_and_a_total(fleet: Fleet) -> None:
    result = oshepherd("pull", "fresh:1b", "--url", fleet.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "pulled fresh:1b on 2 host(s)"
    assert any(line.startswith("alpha") for line in lines)
    assert any(line.startswith("beta") for line in lines)
    assert any(line.startswith("total") for line in lines)
    tags = httpx.get(fleet.url + "/api/tags", timeout=5).json()["models"]
    assert {"alpha", "beta"} <= set(next(m for m in tags if m["name"] == "fresh:1b")["workers"])


def test_pull_from_one_ollama_host_names_no_count(fleet: Fleet) -> None:
    # Ollama's own stream names no workers: the pull ran on that one host.
    result = oshepherd("pull", "solo:1b", "--url", fleet.standins[0].url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "pulled solo:1b"


def test_pull_names_the_host_that_failed_and_exits_1(fleet: Fleet) -> None:
    beta = fleet.standins[1]
    beta.progress_delay = 0.0
    beta.fail_next(500, "disk full")
    alpha = fleet.standins[0]
    alpha.progress_delay = 0.05  # alpha is still pulling when beta fails
    try:
        result = oshepherd("pull", "other:1b", "--url", fleet.url)
    finally:
        alpha.progress_delay = 0.0
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: pull of other:1b failed on beta (beta: disk full)"
    assert any(line.startswith("alpha") for line in result.stdout.splitlines())


def test_status_watch_refreshes_until_ctrl_c(fleet: Fleet) -> None:
    command = [sys.executable, "-m", "oshepherd", "status", "--watch", "0.2", "--url", fleet.url]
    before = fleet_reads(fleet)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as watch:
        # It refreshed at least twice (its first read and one of the watch's): it is watching.
        wait_until(lambda: fleet_reads(fleet) >= before + 2, 20, "status --watch refreshing")
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    assert b"2 worker(s)" in out and b"alpha" in out


def fleet_reads(fleet: Fleet) -> float:
    """How many GET /oshepherd/v1/fleet the API has answered (its /metrics)."""
    text = httpx.get(fleet.url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("oshepherd_requests_total{") and 'route="/oshepherd/v1/fleet"' in line
    )
