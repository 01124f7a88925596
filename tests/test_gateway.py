"""The gateway core through the official ollama client: two hosts, two workers, one API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import httpx
import ollama
import pytest

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from tests.conftest import tag_names, two_hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    models = ("llama3", "shared:7b"), ("qwen2:7b", "shared:7b")
    with two_hosts(redis_server, stack_log, *models, version="0.11.4") as fleet:
        yield fleet


def test_list_is_the_union_without_duplicates(client: ollama.Client, fleet: Fleet) -> None:
    models = client.list().models
    names = [str(m.model) for m in models]
    assert sorted(names) == ["llama3:latest", "qwen2:7b", "shared:7b"]
    raw = httpx.get(fleet.url + "/api/tags").json()["models"]
    shared = next(m for m in raw if m["name"] == "shared:7b")
    assert len(shared["workers"]) == 2
    assert shared["details"]["family"] == "llama"


def test_generate_streaming_and_not(client: ollama.Client) -> None:
    chunks = list(client.generate(model="llama3", prompt="hi", stream=True))
    assert "".join(c.response or "" for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1].done and chunks[-1].eval_count == 5
    assert all(c.model == "llama3" for c in chunks)  # echoed exactly as sent
    whole = client.generate(model="llama3", prompt="hi")
    assert whole.response == "tok0 tok1 tok2 tok3 tok4 " and whole.done
    assert whole.total_duration and whole.total_duration > 0


def test_chat_streaming_and_not(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "hello"}]
    parts = list(client.chat(model="qwen2:7b", messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "tok0 tok1 tok2 tok3 tok4 "
    assert parts[-1].done
    reply = client.chat(model="QWEN2:7B", messages=messages)
    assert (
        reply.message.role == "assistant" and reply.message.content == "tok0 tok1 tok2 tok3 tok4 "
    )
    assert reply.model == "QWEN2:7B"


def test_embed_embeddings_show_ps_version(client: ollama.Client, fleet: Fleet) -> None:
    embedded = client.embed(model="llama3", input=["a", "b", "c"])
    assert len(embedded.embeddings) == 3 and len(embedded.embeddings[0]) == 8
    single = client.embeddings(model="llama3", prompt="a")
    assert list(single.embedding) == list(embedded.embeddings[0])
    shown = client.show("llama3")
    assert shown.modelinfo is not None and shown.details and shown.details.family == "llama"
    # /api/ps is the workers' view as of their last heartbeat.
    wait_until(lambda: "llama3:latest" in {m.model for m in client.ps().models}, 5, "ps")
    # The fleet reports its lowest Ollama version: clients gate features on it.
    assert httpx.get(fleet.url + "/api/version").json() == {"version": "0.11.4"}


def test_a_model_only_one_host_has_is_always_served_by_it(
    client: ollama.Client, fleet: Fleet
) -> None:
    a, b = fleet.standins
    for _ in range(6):
        client.generate(model="qwen2:7b", prompt="x")
        client.generate(model="llama3", prompt="x")
    assert b.count("/api/generate") == 6 and a.count("/api/generate") == 6
    assert {body["model"] for _, path, body in b.requests if path == "/api/generate"} == {
        "qwen2:7b"
    }


def test_concurrent_jobs_spread_over_every_holder(client: ollama.Client, fleet: Fleet) -> None:
    a, b = fleet.standins
    a.latency = b.latency = 1.0
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(lambda _: client.generate(model="shared:7b", prompt="x"), range(8))
            )
    finally:
        a.latency = b.latency = 0.0
    assert all(r.done for r in replies)
    # 8 jobs over 2 workers x 4 slots: each host ran 4 at once.
    assert a.peak_active == 4 and b.peak_active == 4


def test_unknown_model_is_404_at_once(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope:1b", prompt="x")
    assert info.value.status_code == 404
    assert info.value.error == "model 'nope:1b' not found"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "invalid JSON"),
        (b"", 400, "missing request body"),
        (b"[1, 2]", 400, "expected a JSON object"),
        (b'{"prompt": "x"}', 400, "model is required"),
        (b'{"model": 7}', 400, "invalid model name"),
        (b'{"model": "llama3", "stream": "yes"}', 400, "'stream'"),
    ],
)
def test_bad_requests_get_ollama_shaped_400s(
    fleet: Fleet, body: bytes, status: int, error: str
) -> None:
    response = httpx.post(fleet.url + "/api/generate", content=body)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert error in response.json()["error"]


def test_ollama_errors_pass_through(client: ollama.Client, fleet: Fleet) -> None:
    a = fleet.standins[0]
    a.fail_next(500, "llama runner process has terminated")
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llama3", prompt="x")
    assert info.value.status_code == 500
    assert info.value.error == "llama runner process has terminated"


def test_mid_stream_errors_pass_through(fleet: Fleet) -> None:
    a = fleet.standins[0]
    a.fail_mid_stream("out of memory", after=2)
    response = httpx.post(fleet.url + "/api/generate", json={"model": "llama3", "prompt": "x"})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert response.status_code == 200
    assert [line.get("response") for line in lines[:2]] == ["tok0 ", "tok1 "]
    assert lines[-1] == {"error": "out of memory"}


def test_curl_without_stream_gets_ndjson(fleet: Fleet) -> None:
    # curl -d sends form-urlencoded; the body is JSON all the same. Trailing slash as in
    # the original oshepherd README.
    response = httpx.post(
        fleet.url + "/api/generate/",
        content=b'{"model": "llama3", "prompt": "Why is the sky blue?"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = response.text.split("\n")
    assert lines[-1] == "" and all(lines[:-1])  # no blank line anywhere
    assert len(lines) == 7 and json.loads(lines[-2])["done"] is True


def test_root_and_head(fleet: Fleet) -> None:
    assert httpx.get(fleet.url + "/").text == "Ollama is running"
    assert httpx.head(fleet.url + "/").status_code == 200
    assert httpx.head(fleet.url + "/api/version").status_code == 200


def test_workers_follow_models_pulled_and_deleted_on_their_host(
    client: ollama.Client, fleet: Fleet
) -> None:
    b = fleet.standins[1]
    b.models.add("fresh:1b")  # as `ollama pull` on that host would
    wait_until(lambda: "fresh:1b" in tag_names(fleet.url), 10, "new model listed")
    assert client.generate(model="fresh:1b", prompt="x").done
    assert b.count("/api/generate") == 1
    b.models.discard("fresh:1b")
    wait_until(lambda: "fresh:1b" not in tag_names(fleet.url), 10, "model unlisted")
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="fresh:1b", prompt="x")
    assert info.value.status_code == 404
