"""The gateway core through the official ollama client: two hosts, two workers, one API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import httpx
import ollama
import pytest

from oshepherd import durations
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import tag_names, two_hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

# What `ollama stop shared:7b` sends (cmd/cmd.go loadOrUnloadModel: api.GenerateRequest with
# a zero api.Duration, marshalled as "0s"; the Go client reads the answer as a stream).
STOP = b'{"model":"shared:7b","prompt":"","suffix":"","system":"","template":"",' \
       b'"keep_alive":"0s","options":null}'  # fmt: skip


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


def running(fleet: Fleet) -> dict[str, int]:
    """The gateway's /api/ps: how many workers run each model."""
    models = httpx.get(fleet.url + "/api/ps", timeout=5).json()["models"]
    return {m["model"]: len(m["workers"]) for m in models}


def host_running(host: StandIn) -> list[str]:
    return [m["model"] for m in httpx.get(host.url + "/api/ps", timeout=5).json()["models"]]


def unloads(host: StandIn) -> int:
    """How many unloads reached ``host`` (generate or chat with keep_alive 0)."""
    return sum(
        1
        for _, path, body in list(host.requests)
        if path in ("/api/generate", "/api/chat") and durations.is_zero(body.get("keep_alive"))
    )


def test_ollama_stop_frees_the_model_on_every_host(client: ollama.Client, fleet: Fleet) -> None:
    a, b = fleet.standins
    for host in (a, b):  # a generation on each host loaded it there
        loaded = httpx.post(host.url + "/api/generate", json={"model": "shared:7b"}, timeout=5)
        assert loaded.json()["done_reason"] == "load"
    wait_until(lambda: running(fleet).get("shared:7b") == 2, 10, "shared:7b running on both")
    # Ollama answers the unload, then its scheduler frees the model.
    a.unload_delay = b.unload_delay = 0.3
    try:
        with httpx.stream("POST", fleet.url + "/api/generate", content=STOP, timeout=10) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"] == "application/json; charset=utf-8"
            answer = json.loads(reply.read())
    finally:
        a.unload_delay = b.unload_delay = 0.0
    assert answer["done_reason"] == "unload" and answer["done"] is True
    assert (answer["model"], answer["response"]) == ("shared:7b", "")
    assert unloads(a) == unloads(b) == 1
    # At once, not a heartbeat later: the fleet and each host list it nowhere.
    assert "shared:7b" not in running(fleet)
    assert "shared:7b" not in host_running(a) + host_running(b)
    # Loaded nowhere: one holder answers, as Ollama would.
    assert client.generate(model="shared:7b", keep_alive=0).done_reason == "unload"
    assert unloads(a) + unloads(b) == 3


def test_ollama_python_stop_and_a_chat_unload(client: ollama.Client, fleet: Fleet) -> None:
    a, b = fleet.standins
    with ThreadPoolExecutor(2) as pool:  # the first generation on each host loads it there
        assert all(pool.map(lambda h: _load_directly(h, "shared:7b"), (a, b)))
    wait_until(lambda: running(fleet).get("shared:7b") == 2, 10, "shared:7b running on both")
    reply = client.chat(model="shared:7b", messages=[], keep_alive="0m", stream=True)
    parts = list(reply)
    assert len(parts) == 1 and parts[0].done_reason == "unload"
    assert parts[0].message.role == "assistant" and parts[0].message.content == ""
    assert unloads(a) == unloads(b) == 1
    assert "shared:7b" not in running(fleet)


def test_a_stop_straight_after_a_first_generation_frees_its_host(
    client: ollama.Client, fleet: Fleet
) -> None:
    """A generation that loads its model advertises it before it answers, so a stop sent
    the moment it ends (well within a heartbeat) reaches that host."""
    a, b = fleet.standins
    assert client.generate(model="shared:7b", keep_alive=0).done_reason == "unload"
    assert "shared:7b" not in host_running(a) + host_running(b)
    assert client.generate(model="shared:7b", prompt="hi").done is True  # loads it on one
    (loaded_on,) = [h for h in (a, b) if "shared:7b" in host_running(h)]
    before = unloads(loaded_on)
    assert client.generate(model="shared:7b", keep_alive=0).done_reason == "unload"
    assert unloads(loaded_on) == before + 1
    assert "shared:7b" not in host_running(a) + host_running(b)
    assert "shared:7b" not in running(fleet)


def _load_directly(host: StandIn, model: str) -> bool:
    return bool(httpx.post(host.url + "/api/chat", json={"model": model}).json()["done"])


def test_a_load_and_an_unload_show_in_ps_at_once(client: ollama.Client, fleet: Fleet) -> None:
    assert client.generate(model="llama3", keep_alive=0).done_reason == "unload"
    assert "llama3:latest" not in running(fleet)
    assert client.generate(model="llama3").done_reason == "load"
    assert running(fleet).get("llama3:latest") == 1  # not a heartbeat later
    assert "llama3:latest" in {m.model for m in client.ps().models}
    assert client.chat(model="llama3", messages=[], keep_alive=0.0).done_reason == "unload"
    assert "llama3:latest" not in running(fleet)


def test_each_line_leaves_as_its_own_chunk(fleet: Fleet) -> None:
    """Ollama flushes every NDJSON line (and SSE event) on its own; clients that parse each
    read as one object rely on it. Many fast tokens reach the worker in bursts."""
    a = fleet.standins[0]
    a.tokens = 300
    try:
        ndjson = _reads(fleet, "/api/generate", {"model": "llama3", "prompt": "x"})
        sse = _reads(fleet, "/v1/chat/completions", {"model": "llama3", "stream": True,
                     "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    finally:
        a.tokens = 5
    for reads, end in ((ndjson, b"\n"), (sse, b"\n\n")):
        body = b"".join(reads)
        assert body.count(end) > 300
        # A line or event ends only where a chunk ends (a chunk may arrive in two reads).
        assert all(read.find(end) in (-1, len(read) - len(end)) for read in reads)
    assert json.loads(b"".join(ndjson).splitlines()[-1])["done"] is True


def _reads(fleet: Fleet, path: str, body: dict[str, object]) -> list[bytes]:
    """The HTTP chunks of a streamed answer, as the client's reads get them."""
    with httpx.stream("POST", fleet.url + path, json=body, timeout=10) as response:
        assert response.status_code == 200
        return [piece for piece in response.iter_raw() if piece]
