"""Fleet-wide model management through the official ollama client: two hosts, two workers."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import httpx
import ollama
import orjson
import pytest

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import tag_names, two_hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    models = ("llama3", "shared:7b"), ("qwen2:7b", "shared:7b")
    with two_hosts(redis_server, stack_log, *models, worker_ids=("alpha", "beta")) as fleet:
        yield fleet


def holders(fleet: Fleet, name: str) -> list[str]:
    """The workers /api/tags says hold ``name`` (empty when it is not listed)."""
    models = httpx.get(fleet.url + "/api/tags", timeout=5).json()["models"]
    return sorted(next((m["workers"] for m in models if m["name"] == name), []))


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"] == "application/x-ndjson"
    return [orjson.loads(line) for line in response.text.splitlines()]


def test_pull_streams_one_progress_and_the_model_serves_everywhere(
    client: ollama.Client, fleet: Fleet
) -> None:
    a, b = fleet.standins
    parts = list(client.pull("fresh", stream=True))
    assert parts[-1].status == "success"
    assert [p.status for p in parts].count("success") == 1
    layers = [p for p in parts if p.digest]
    # Per layer: the sum over both hosts, its length right from the first line.
    assert layers and all(p.total == 2000 for p in layers)
    assert [p.completed for p in layers] == sorted(p.completed or 0 for p in layers)
    assert layers[-1].completed == 2000
    assert a.count("/api/pull") == b.count("/api/pull") == 1
    # Routable as soon as the pull answered: the registry was reread before "success".
    assert "fresh:latest" in {m.model for m in client.list().models}
    assert holders(fleet, "fresh:latest") == ["alpha", "beta"]
    a.latency = b.latency = 0.3
    try:
        wait_until(lambda: _spread(client, "fresh", a, b), 20, "both hosts answer 'fresh'")
    finally:
        a.latency = b.latency = 0.0


def _spread(client: ollama.Client, model: str, a: StandIn, b: StandIn) -> bool:
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: client.generate(model=model, prompt="x"), range(8)))
    assert all(r.done for r in replies)
    return a.count("/api/generate") > 0 and b.count("/api/generate") > 0


def test_merged_lines_on_the_wire(fleet: Fleet) -> None:
    response = httpx.post(fleet.url + "/api/pull", json={"model": "wire:1b"}, timeout=30)
    assert response.status_code == 200
    lines = ndjson(response)
    statuses = [line.get("status") for line in lines]
    assert statuses.count("pulling manifest") == 1  # said once, not once per host
    assert lines[-1] == {"status": "success"}
    layer = [line for line in lines if "digest" in line][-1]
    assert layer["workers"] == 2 and layer["total"] == layer["completed"] == 2000


def test_progress_from_hosts_of_different_speeds_never_goes_backwards(fleet: Fleet) -> None:
    b = fleet.standins[1]
    b.progress_delay = 0.05  # alpha's host is done before beta's has begun its layer
    try:
        response = httpx.post(fleet.url + "/api/pull", json={"model": "paced:1b"}, timeout=30)
    finally:
        b.progress_delay = 0.0
    lines = ndjson(response)
    statuses = [line.get("status") for line in lines]
    layers = [(i, line) for i, line in enumerate(lines) if "digest" in line]
    assert [line["total"] for _, line in layers] == [2000] * len(layers)
    completed = [line["completed"] for _, line in layers]
    assert completed == sorted(completed) and completed[-1] == 2000
    assert any(line["workers"] == 1 for _, line in layers)  # beta had not begun
    # The tail comes once, after every host has every layer; success last.
    tail = ["verifying sha256 digest", "writing manifest", "success"]
    assert statuses[layers[-1][0] + 1 :] == tail
    assert all(statuses.count(status) == 1 for status in ["pulling manifest", *tail])


def test_pull_without_stream_answers_only_the_end(client: ollama.Client, fleet: Fleet) -> None:
    reply = client.pull("quiet:2b", stream=False)
    assert reply.status == "success"
    for host in fleet.standins:
        pulls = [body for _, path, body in host.requests if path == "/api/pull"]
        assert [body.get("stream") for body in pulls] == [False]
    assert holders(fleet, "quiet:2b") == ["alpha", "beta"]


def test_delete_removes_a_model_everywhere(client: ollama.Client, fleet: Fleet) -> None:
    a, b = fleet.standins
    a.models.add("doomed:1b")
    b.models.add("doomed:1b")
    wait_until(lambda: holders(fleet, "doomed:1b") == ["alpha", "beta"], 10, "doomed listed")
    assert client.delete("doomed:1b").status == "success"
    assert a.count("/api/delete") == b.count("/api/delete") == 1
    assert "doomed:1b" not in tag_names(fleet.url)  # at once, not a heartbeat later
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="doomed:1b", prompt="x")
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("doomed:1b")
    assert info.value.status_code == 404


def test_delete_of_an_unknown_model_is_404(client: ollama.Client, fleet: Fleet) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("nope:1b")
    assert (info.value.status_code, info.value.error) == (404, "model 'nope:1b' not found")
    assert all(host.count("/api/delete") == 0 for host in fleet.standins)


def test_copy_acts_where_the_source_is(client: ollama.Client, fleet: Fleet) -> None:
    a, b = fleet.standins
    assert client.copy("shared:7b", "twin:7b").status == "success"
    assert holders(fleet, "twin:7b") == ["alpha", "beta"]
    assert client.copy("llama3", "llama-copy").status == "success"
    assert (a.count("/api/copy"), b.count("/api/copy")) == (2, 1)
    assert holders(fleet, "llama-copy:latest") == ["alpha"]
    response = httpx.post(fleet.url + "/api/copy", json={"source": "llama3"})
    assert response.status_code == 400 and "destination" in response.json()["error"]


def test_create_from_an_existing_model(client: ollama.Client, fleet: Fleet) -> None:
    parts = list(client.create(model="custom", from_="shared:7b", system="be brief", stream=True))
    assert parts[-1].status == "success"
    assert all(host.count("/api/create") == 1 for host in fleet.standins)
    assert holders(fleet, "custom:latest") == ["alpha", "beta"]
    with pytest.raises(ollama.ResponseError) as info:
        client.create(model="empty")  # neither 'from' nor 'files': every host refuses
    assert info.value.status_code == 400
    assert info.value.error.startswith("create failed on alpha, beta: neither")


def test_push_from_the_holders(client: ollama.Client, fleet: Fleet) -> None:
    a, b = fleet.standins
    parts = list(client.push("shared:7b", stream=True))
    assert parts[-1].status == "success"
    assert a.count("/api/push") == b.count("/api/push") == 1
    assert client.push("llama3").status == "success"
    assert (a.count("/api/push"), b.count("/api/push")) == (2, 1)


def test_a_caller_picks_the_workers(client: ollama.Client, fleet: Fleet) -> None:
    a, b = fleet.standins
    alpha = ollama.Client(host=fleet.url, headers={"X-Oshepherd-Workers": "alpha"})
    assert alpha.pull("solo:1b").status == "success"
    assert (a.count("/api/pull"), b.count("/api/pull")) == (1, 0)
    assert holders(fleet, "solo:1b") == ["alpha"]
    url = fleet.url + "/api/pull?workers=beta"
    assert httpx.post(url, json={"model": "other:1b", "stream": False}).status_code == 200
    assert (a.count("/api/pull"), b.count("/api/pull")) == (1, 1)
    url = f"{fleet.url}/api/pull?workers={socket.gethostname()}"  # a hostname: its workers
    assert httpx.post(url, json={"model": "both:1b", "stream": False}).status_code == 200
    assert (a.count("/api/pull"), b.count("/api/pull")) == (2, 2)
    headers = {"X-Oshepherd-Workers": "alpha, gamma"}
    response = httpx.post(fleet.url + "/api/pull", json={"model": "x"}, headers=headers)
    assert (response.status_code, response.json()) == (400, {"error": "unknown worker 'gamma'"})


def test_a_failure_on_one_host_ends_the_stream_with_its_error(
    client: ollama.Client, fleet: Fleet
) -> None:
    a, b = fleet.standins
    both = ollama.Client(host=fleet.url, headers={"X-Oshepherd-Workers": "alpha,beta"})
    seen: list[str] = []
    with pytest.raises(ollama.ResponseError) as info:
        for part in both.push("llama3", stream=True):  # only alpha's host has it
            seen.append(part.status or "")
    assert info.value.error == "push failed on beta: model 'llama3' not found"
    assert seen and "success" not in seen
    assert (a.count("/api/push"), b.count("/api/push")) == (1, 1)
    response = httpx.post(
        fleet.url + "/api/copy",
        json={"source": "llama3", "destination": "llama-twin"},
        headers={"X-Oshepherd-Workers": "alpha,beta"},
    )
    assert response.status_code == 404
    assert response.json() == {"error": "copy failed on beta: model 'llama3' not found"}


def test_a_pull_failing_on_one_host_names_it(client: ollama.Client, fleet: Fleet) -> None:
    b = fleet.standins[1]
    both = ollama.Client(host=fleet.url, headers={"X-Oshepherd-Workers": "alpha,beta"})
    b.stop()
    try:
        with pytest.raises(ollama.ResponseError) as info:
            list(both.pull("halfway:1b", stream=True))
        assert info.value.error.startswith("pull failed on beta: worker beta cannot reach")
        wait_until(lambda: "qwen2:7b" not in tag_names(fleet.url), 10, "beta seen unhealthy")
    finally:
        b.start()
        wait_until(lambda: "qwen2:7b" in tag_names(fleet.url), 10, "beta healthy again")
    assert holders(fleet, "halfway:1b") == ["alpha"]


def test_a_pull_failing_everywhere_is_an_http_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        list(client.pull("missing:1b", stream=True))
    assert info.value.status_code == 500
    message = "pull failed on alpha, beta: pull model manifest: file does not exist"
    assert info.value.error == message
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("missing:1b", stream=False)
    assert info.value.status_code == 500


def test_name_alias_trailing_slash_and_bad_input(fleet: Fleet) -> None:
    response = httpx.post(fleet.url + "/api/pull/", json={"name": "aliased:1b", "stream": False})
    assert (response.status_code, response.json()) == (200, {"status": "success"})
    assert holders(fleet, "aliased:1b") == ["alpha", "beta"]
    response = httpx.request("DELETE", fleet.url + "/api/delete", json={"name": "aliased:1b"})
    assert (response.status_code, response.content) == (200, b"")
    assert holders(fleet, "aliased:1b") == []
    response = httpx.post(fleet.url + "/api/pull", json={"model": "x", "stream": "no"})
    assert response.status_code == 400 and "'stream'" in response.json()["error"]
    response = httpx.post(fleet.url + "/api/push", json={})
    assert (response.status_code, response.json()) == (400, {"error": "model is required"})


def test_blobs_are_checked_on_every_host(
    client: ollama.Client, fleet: Fleet, tmp_path: Path
) -> None:
    a, b = fleet.standins
    data = b"GGUF and then some"
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    url = f"{fleet.url}/api/blobs/{digest}"
    assert httpx.head(url).status_code == 404
    assert httpx.post(f"{a.url}/api/blobs/{digest}", content=data).status_code == 201
    assert httpx.head(url).status_code == 404  # beta's host lacks it
    assert httpx.head(url, headers={"X-Oshepherd-Workers": "alpha"}).status_code == 200
    assert httpx.head(f"{fleet.url}/api/blobs/sha256:nothex").status_code == 400
    # ollama-python's create_blob (which never checks first) uploads through the gateway:
    # beta's host gets it, alpha's already had it (tests/test_blobs.py has the rest).
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    assert client.create_blob(path) == digest
    assert b.has_blob(digest)
    assert httpx.head(url).status_code == 200


def test_without_workers(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    fleet.start_api()
    response = httpx.post(fleet.url + "/api/pull", json={"model": "x"})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    response = httpx.request("DELETE", fleet.url + "/api/delete", json={"model": "x"})
    assert (response.status_code, response.json()) == (404, {"error": "model 'x' not found"})
