"""Sanity checks of the Ollama stand-in itself, mostly through the official ollama client."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import ollama
import pytest

from oshepherd.redis_server import free_port
from oshepherd.stack import wait_until
from oshepherd.testing.standin import StandIn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


@pytest.fixture
def stand() -> Iterator[StandIn]:
    with StandIn(["llama3:latest", "qwen2:7b"]) as s:
        yield s


@pytest.fixture
def http(stand: StandIn) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stand.url) as c:
        yield c


@pytest.fixture
def client(stand: StandIn) -> Iterator[ollama.Client]:
    c = ollama.Client(host=stand.url)
    yield c
    c.close()


def test_root_version_list_show(client: ollama.Client, http: httpx.Client) -> None:
    root = http.get("/")
    assert root.text == "Ollama is running"
    assert root.headers["content-type"].startswith("text/plain")
    assert http.head("/").status_code == 200
    assert http.get("/api/version").json() == {"version": "0.12.0"}
    assert [m.model for m in client.list().models] == ["llama3:latest", "qwen2:7b"]
    shown = client.show("LLAMA3")
    assert shown.modelinfo and "completion" in (shown.capabilities or [])
    assert shown.details and shown.details.family == "llama"


def test_generate(stand: StandIn, client: ollama.Client) -> None:
    whole = client.generate(model="llama3", prompt="hello there")
    assert whole.model == "llama3" and whole.response == "tok0 tok1 tok2 tok3 tok4 "
    assert whole.done and whole.done_reason == "stop" and whole.eval_count == 5
    assert whole.total_duration and whole.eval_duration and whole.prompt_eval_count == 2
    parts = list(client.generate(model="llama3:latest", prompt="hi", stream=True, think=True))
    assert "".join(p.response or "" for p in parts) == whole.response
    assert "".join(p.thinking or "" for p in parts).startswith("think0 ")
    assert [p.done for p in parts] == [False] * 5 + [True] and parts[-1].context == [1, 2, 3]
    assert json.loads(client.generate(model="llama3", prompt="x", format="json").response or "")
    assert client.generate(model="llama3").done_reason == "load"
    assert client.generate(model="llama3", keep_alive=0).done_reason == "unload"
    stand.wait_for(lambda s: s.completed == 5 and s.active == 0)
    assert stand.tokens_sent == 15 and stand.disconnects == 0


def test_ndjson_wire_format(http: httpx.Client) -> None:
    with http.stream(
        "POST",
        "/api/chat",
        content=b'{"model":"qwen2:7b","messages":[{"role":"user","content":"hi"}]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        raw = r.read()
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1])
    final = json.loads(lines[-2])
    assert final["done"] and final["message"] == {"role": "assistant", "content": ""}


def test_chat_tools_and_stream(stand: StandIn, client: ollama.Client) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    msgs = [{"role": "user", "content": "add"}]
    reply = client.chat(model="qwen2:7b", messages=msgs, tools=tools)
    assert reply.message.content == "tok0 tok1 tok2 tok3 tok4 "
    calls = reply.message.tool_calls or []
    assert calls[0].function.name == "add" and calls[0].function.arguments == {"x": 1}
    parts = list(client.chat(model="qwen2:7b", messages=msgs, tools=tools, stream=True))
    assert parts[-2].message.tool_calls and parts[-1].done
    method, path, body = stand.requests[-1]
    assert (method, path, body["messages"], body["stream"]) == ("POST", "/api/chat", msgs, True)
    assert body["tools"][0]["function"]["name"] == "add"


def test_embed_is_batch_independent(client: ollama.Client) -> None:
    batch = client.embed(model="llama3", input=["a", "b", "c"]).embeddings
    assert len(batch) == 3 and all(len(v) == 8 for v in batch)
    assert client.embed(model="llama3", input="b").embeddings == [batch[1]]
    assert list(client.embeddings(model="llama3", prompt="c").embedding) == batch[2]


def test_ps_pull_copy_delete(stand: StandIn, client: ollama.Client) -> None:
    assert client.ps().models == []
    client.generate(model="qwen2:7b", prompt="hi")
    assert [m.model for m in client.ps().models] == ["qwen2:7b"]
    progress = list(client.pull("mistral", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.total == 1000 and p.digest for p in progress)
    assert client.pull("phi3", stream=False).status == "success"
    assert {"mistral:latest", "phi3:latest"} <= stand.models
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("missing-model")
    assert err.value.status_code == 500 and "file does not exist" in err.value.error
    assert client.copy("phi3", "phi3-copy").status == "success"
    assert client.create(model="mario", from_="llama3").status == "success"
    assert client.delete("phi3-copy").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("phi3-copy")
    assert err.value.status_code == 404 and err.value.error == "model 'phi3-copy' not found"
    assert list(client.push("mario", stream=True))[-1].status == "success"


def test_blobs(client: ollama.Client, http: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"weights")
    digest = f"sha256:{hashlib.sha256(b'weights').hexdigest()}"
    assert http.head(f"/api/blobs/{digest}").status_code == 404
    assert client.create_blob(path) == digest
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.head(f"/api/blobs/{digest.replace(':', '-')}").status_code == 200
    # As Ollama: a blob it has is 200, its body unread; else the digest is checked, and the
    # bytes are kept under the digest they really have.
    assert http.post(f"/api/blobs/{digest}", content=b"other").status_code == 200
    wrong = f"sha256:{'0' * 64}"
    response = http.post(f"/api/blobs/{wrong}", content=b"other")
    got = f"sha256:{hashlib.sha256(b'other').hexdigest()}"
    assert response.status_code == 400
    assert response.json() == {"error": f'digest mismatch, expected "{wrong}", got "{got}"'}
    assert http.head(f"/api/blobs/{wrong}").status_code == 404
    assert http.head(f"/api/blobs/{got}").status_code == 200
    assert http.post("/api/blobs/sha256:nothex", content=b"x").status_code == 400


def test_errors(stand: StandIn, client: ollama.Client, http: httpx.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="Nope", prompt="hi")
    assert err.value.status_code == 404 and err.value.error == "model 'Nope' not found"
    for content, message in [(b"", "missing request body"), (b'{"x":1}', "model is required")]:
        r = http.post("/api/generate", content=content)
        assert (r.status_code, r.json()) == (400, {"error": message})
        assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert http.post("/api/generate", content=b"{nope").status_code == 400
    assert http.post("/api/chat", json={"model": "llama3", "messages": "x"}).status_code == 400
    v1 = http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert v1.status_code == 404 and v1.json()["error"]["type"] == "not_found_error"
    assert http.get("/v1/models/nope").status_code == 404
    assert http.get("/no/such/path").status_code == 404
    assert stand.count("/api/generate") == 4 and stand.count("/no/such/path") == 1


def test_fail_next(stand: StandIn, client: ollama.Client) -> None:
    stand.fail_next(503, "server busy", count=2)
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503 and err.value.error == "server busy"
    assert client.generate(model="llama3", prompt="hi").done
    stand.wait_for(lambda s: s.active == 0 and s.completed == 1)


def test_fail_mid_stream(stand: StandIn, client: ollama.Client) -> None:
    stand.fail_mid_stream("model runner crashed", after=2)
    seen = []
    with pytest.raises(ollama.ResponseError, match="model runner crashed"):
        for part in client.generate(model="llama3", prompt="hi", stream=True):
            seen.append(part.response)
    assert seen == ["tok0 ", "tok1 "]
    assert "".join(
        p.response or "" for p in client.generate(model="llama3", prompt="hi", stream=True)
    )


def test_disconnect_stops_generation(stand: StandIn, http: httpx.Client) -> None:
    stand.tokens, stand.token_delay = 1000, 0.01
    with http.stream("POST", "/api/generate", json={"model": "llama3", "prompt": "go"}) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["response"] == "tok0 "
        next(lines)
    stand.wait_for(lambda s: s.disconnects == 1 and s.active == 0)
    sent = stand.tokens_sent
    assert sent < 100  # 1000 tokens would take 10 s
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        assert stand.tokens_sent == sent
        time.sleep(0.02)
    assert stand.completed == 0


def test_max_parallel_and_latency(stand: StandIn) -> None:
    stand.max_parallel, stand.latency = 1, 0.15
    start = time.monotonic()
    threads = [
        threading.Thread(
            target=httpx.post,
            args=(f"{stand.url}/api/embed",),
            kwargs={"json": {"model": "llama3", "input": "x"}},
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start >= 0.45
    stand.wait_for(lambda s: s.completed == 3 and s.active == 0)
    assert stand.peak_active == 3


def test_openai_layer(http: httpx.Client) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    done = http.post("/v1/chat/completions", json={"model": "llama3", "messages": msgs}).json()
    assert done["object"] == "chat.completion" and done["usage"]["completion_tokens"] == 5
    assert done["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    with http.stream(
        "POST", "/v1/chat/completions", json={"model": "llama3", "messages": msgs, "stream": True}
    ) as r:
        assert r.headers["content-type"] == "text/event-stream"
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"
    text = http.post("/v1/completions", json={"model": "llama3", "prompt": "hi"}).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"].startswith("tok0")
    emb = http.post("/v1/embeddings", json={"model": "llama3", "input": ["a", "b"]}).json()
    assert [d["index"] for d in emb["data"]] == [0, 1]
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == ["llama3:latest", "qwen2:7b"]
    assert http.get("/v1/models/qwen2:7b").json()["owned_by"] == "library"


def test_openai_sdk(stand: StandIn) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{stand.url}/v1", api_key="ollama") as sdk:
        msgs = [{"role": "user", "content": "hi"}]
        reply = sdk.chat.completions.create(model="llama3", messages=msgs)
        assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        stream = sdk.chat.completions.create(model="llama3", messages=msgs, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert len(sdk.embeddings.create(model="llama3", input=["a", "b"]).data) == 2
        assert [m.id for m in sdk.models.list()] == ["llama3:latest", "qwen2:7b"]
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("nope")


def test_compatibility_layers(stand: StandIn, http: httpx.Client) -> None:
    """/v1/messages, /v1/responses and /v1/audio/transcriptions as Ollama's middleware
    answers them (the SDK-level checks are in test_anthropic.py and test_openai.py)."""
    ask = {"model": "llama3", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    message = http.post("/v1/messages", json=ask).json()
    assert message["type"] == "message" and message["stop_reason"] == "end_turn"
    streamed = http.post("/v1/messages", json={**ask, "stream": True}).text
    names = [line[7:] for line in streamed.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    refused = http.post("/v1/messages", json={**ask, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["type"] == "error"
    assert refused.json()["request_id"].startswith("req_")  # as anthropic.NewError
    response = http.post("/v1/responses", json={"model": "llama3", "input": "hi"}).json()
    assert response["output"][0]["content"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 "
    files = {"file": ("a.wav", b"RIFF\x00\xff")}
    heard = http.post("/v1/audio/transcriptions", data={"model": "llama3"}, files=files)
    assert heard.json() == {"text": "tok0 tok1 tok2 tok3 tok4"}
    assert stand.requests[-1][2] == {"model": "llama3", "file": b"RIFF\x00\xff"}


def test_restart_keeps_port(stand: StandIn, client: ollama.Client) -> None:
    url = stand.url
    stand.stop()
    with pytest.raises(ConnectionError):
        client.list()
    stand.start()
    assert stand.url == url and client.generate(model="llama3", prompt="hi").done


def test_runs_as_a_process_from_any_directory(tmp_path: Path) -> None:
    port = free_port()
    module = "oshepherd.testing.standin"
    cmd = [sys.executable, "-m", module, "--port", str(port), "--models", "a,b:7b"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env)
    try:
        tags = wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/api/tags").json(), 15, "tags", process=proc
        )
        assert [m["name"] for m in tags["models"]] == ["a:latest", "b:7b"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) in (0, -signal.SIGTERM)


def test_load_unload_and_ps_as_ollama(stand: StandIn, http: httpx.Client) -> None:
    def ps() -> list[str]:
        return [m["model"] for m in http.get("/api/ps").json()["models"]]

    assert ps() == []
    load = http.post("/api/generate", json={"model": "llama3", "keep_alive": "10m"}).json()
    assert load["done_reason"] == "load"
    loaded = http.post("/api/chat", json={"model": "qwen2:7b", "keep_alive": -1})
    assert loaded.headers["content-type"] == "application/json; charset=utf-8"
    assert loaded.json()["message"] == {"role": "assistant", "content": ""}
    models = http.get("/api/ps").json()["models"]
    assert [m["model"] for m in models] == ["qwen2:7b", "llama3:latest"]  # longest-lived first
    expires = datetime.fromisoformat(models[1]["expires_at"]).timestamp() - time.time()
    assert 590 < expires <= 600  # keep_alive "10m"
    assert {"size_vram", "context_length", "details", "digest"} <= set(models[0])
    unloaded = http.post("/api/generate", json={"model": "llama3", "keep_alive": "0s"}).json()
    assert (unloaded["done_reason"], unloaded["response"]) == ("unload", "")
    assert ps() == ["qwen2:7b"]
    stand.unload_delay = 0.2  # Ollama frees the model after it answered
    http.post("/api/chat", json={"model": "qwen2:7b", "messages": [], "keep_alive": 0})
    assert ps() == ["qwen2:7b"]
    wait_until(lambda: ps() == [], 5, "qwen2 freed")
    http.post("/api/generate", json={"model": "llama3", "prompt": "x", "keep_alive": 0})
    assert ps() == []  # a generation with keep_alive 0 leaves nothing loaded
    bad = http.post("/api/generate", json={"model": "llama3", "keep_alive": "soon"})
    assert (bad.status_code, bad.json()) == (400, {"error": 'time: invalid duration "soon"'})
