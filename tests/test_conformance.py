"""Every call of ollama-python's Client and AsyncClient against the gateway: what each client
sends reaches the Ollama host unchanged, and what the host answers parses as the client
expects. Two hosts, one worker each; each test runs once per client."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import ollama
import pytest
from pydantic import BaseModel

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import tag_names, two_hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

TOKENS = "tok0 tok1 tok2 tok3 tok4 "
THINKING = "think0 think1 think2 think3 think4 "
# A 1x1 transparent PNG, as clients send images: base64 without a data: prefix.
PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChw"
    "GA60e6kgAAAABJRU5ErkJggg=="
)
USER = [{"role": "user", "content": "hello"}]
OPTIONS = {"temperature": 0.0, "seed": 7, "num_ctx": 2048, "stop": ["\n\n"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "its name"}},
        },
    },
}


class Answer(BaseModel):
    ok: bool


class Caller:
    """One official client, sync or async, that records the JSON bodies it sends.

    ``caller("chat", ...)`` calls that method on a fresh client and returns its answer, or
    the list of its parts when ``stream=True``.
    """

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url
        self.sent: list[dict[str, Any]] = []

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "async":
            return asyncio.run(self._async(method, args, kwargs))
        with ollama.Client(host=self.url, event_hooks={"request": [self._record]}) as client:
            out = getattr(client, method)(*args, **kwargs)
            return list(out) if kwargs.get("stream") else out

    async def _async(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        async def record(request: httpx.Request) -> None:
            self._record(request)

        async with ollama.AsyncClient(host=self.url, event_hooks={"request": [record]}) as client:
            out = await getattr(client, method)(*args, **kwargs)
            return [part async for part in out] if kwargs.get("stream") else out

    def _record(self, request: httpx.Request) -> None:
        if isinstance(request.stream, httpx.ByteStream) and request.content:  # not an upload
            self.sent.append(json.loads(request.content))


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    models = ("llama3", "shared:7b"), ("qwen2:7b", "shared:7b")
    with two_hosts(redis_server, stack_log, *models) as fleet:
        yield fleet


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest, fleet: Fleet) -> Caller:
    for host in fleet.standins:
        host.reset_counters()
    return Caller(request.param, fleet.url)


def received(host: StandIn, path: str) -> list[dict[str, Any]]:
    """The bodies ``host`` received on ``path``, oldest first."""
    return [body for _, p, body in host.requests if p == path]


def test_generate_forwards_every_field(call: Caller, fleet: Fleet) -> None:
    a = fleet.standins[0]
    reply = call(
        "generate",
        model="llama3",
        prompt="describe",
        suffix="!",
        system="be brief",
        images=[PIXEL],
        format=Answer.model_json_schema(),
        think=True,
        options=OPTIONS,
        keep_alive="10m",
        logprobs=True,
        top_logprobs=2,
        context=[1, 2, 3],
        raw=False,
    )
    assert reply.done and reply.done_reason == "stop" and reply.context == [1, 2, 3]
    assert Answer.model_validate_json(reply.response).ok is True
    assert reply.thinking == THINKING
    assert call.sent[0]["images"] == [PIXEL] and call.sent[0]["options"] == OPTIONS
    assert received(a, "/api/generate") == call.sent


def test_generate_streams(call: Caller, fleet: Fleet) -> None:
    parts = call("generate", model="shared:7b", prompt="hi", stream=True, think=True)
    assert "".join(p.response for p in parts) == TOKENS
    assert "".join(p.thinking or "" for p in parts) == THINKING
    assert [p.done for p in parts] == [False] * 5 + [True]
    assert parts[-1].eval_count == 5 and parts[-1].model == "shared:7b"
    assert [body for h in fleet.standins for body in received(h, "/api/generate")] == call.sent


def test_load_and_unload(call: Caller) -> None:
    assert call("generate", model="llama3").done_reason == "load"
    assert call("generate", model="llama3", keep_alive=0).done_reason == "unload"
    assert call("chat", model="qwen2:7b", messages=[]).done_reason == "load"


def test_chat_with_tools_answers_arguments_as_an_object(call: Caller, fleet: Fleet) -> None:
    b = fleet.standins[1]
    reply = call(
        "chat",
        model="qwen2:7b",
        messages=USER,
        tools=[WEATHER],
        options=OPTIONS,
        keep_alive=300,
        logprobs=True,
        top_logprobs=1,
    )
    (tool_call,) = reply.message.tool_calls or []
    assert tool_call.function.name == "get_weather"
    assert tool_call.function.arguments == {"x": 1}
    parts = call("chat", model="qwen2:7b", messages=USER, tools=[WEATHER], stream=True)
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [c.function.arguments for c in calls] == [{"x": 1}]
    assert call.sent[0]["tools"] == [WEATHER]
    assert received(b, "/api/chat") == call.sent


def test_chat_images_reach_the_host_unchanged(call: Caller, fleet: Fleet) -> None:
    a = fleet.standins[0]
    raw = b"\x89PNG not really"
    messages = [
        {"role": "user", "content": "what is this?", "images": [PIXEL, raw]},
        {"role": "assistant", "content": "a pixel"},
        {"role": "user", "content": "and now?"},
    ]
    reply = call("chat", model="llama3", messages=messages)
    assert reply.message.content == TOKENS
    (body,) = received(a, "/api/chat")
    assert body["messages"][0]["images"] == [PIXEL, base64.b64encode(raw).decode()]
    assert [body] == call.sent


def test_chat_format_schema_passes_through_and_the_reply_parses(call: Caller, fleet: Fleet) -> None:
    schema = Answer.model_json_schema()
    reply = call("chat", model="qwen2:7b", messages=USER, format=schema)
    assert Answer.model_validate_json(reply.message.content).ok is True
    parts = call("chat", model="qwen2:7b", messages=USER, format="json", stream=True)
    assert json.loads("".join(p.message.content or "" for p in parts)) == {"ok": True}
    bodies = received(fleet.standins[1], "/api/chat")
    assert [body["format"] for body in bodies] == [schema, "json"]
    assert bodies == call.sent


def test_chat_think_answers_thinking(call: Caller, fleet: Fleet) -> None:
    reply = call("chat", model="llama3", messages=USER, think=True)
    assert reply.message.thinking == THINKING and reply.message.content == TOKENS
    parts = call("chat", model="llama3", messages=USER, think="high", stream=True)
    assert "".join(p.message.thinking or "" for p in parts) == THINKING
    assert parts[-1].done and parts[-1].message.role == "assistant"
    assert [body["think"] for body in received(fleet.standins[0], "/api/chat")] == [True, "high"]
    assert received(fleet.standins[0], "/api/chat") == call.sent


def test_embed_and_embeddings(call: Caller, fleet: Fleet) -> None:
    a = fleet.standins[0]
    embedded = call(
        "embed",
        model="llama3",
        input=["a", "b"],
        truncate=True,
        options=OPTIONS,
        keep_alive="1m",
        dimensions=8,
    )
    direct = httpx.post(a.url + "/api/embed", json={"model": "llama3", "input": ["a", "b"]})
    assert [list(v) for v in embedded.embeddings] == direct.json()["embeddings"]
    assert embedded.model == "llama3" and embedded.prompt_eval_count == 2
    single = call("embeddings", model="llama3", prompt="a", options=OPTIONS, keep_alive=60)
    assert list(single.embedding) == direct.json()["embeddings"][0]
    assert received(a, "/api/embed")[:1] + received(a, "/api/embeddings") == call.sent


def test_list_show_ps(call: Caller, fleet: Fleet) -> None:
    models = call("list").models
    assert sorted(m.model or "" for m in models) == ["llama3:latest", "qwen2:7b", "shared:7b"]
    assert all(m.details and m.details.family == "llama" and m.size for m in models)
    shown = call("show", "qwen2:7b")
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == "llama"
    assert shown.capabilities == ["completion", "tools", "thinking"]
    assert received(fleet.standins[1], "/api/show") == call.sent == [{"model": "qwen2:7b"}]
    call("generate", model="qwen2:7b", prompt="load it")
    # /api/ps is the workers' view as of their last heartbeat.
    wait_until(lambda: "qwen2:7b" in {m.model for m in call("ps").models}, 5, "qwen2 running")
    running = next(m for m in call("ps").models if m.model == "qwen2:7b")
    assert running.expires_at and running.size_vram and running.context_length == 8192


def test_pull_streams_progress_to_success(call: Caller, fleet: Fleet) -> None:
    name = f"pulled-{call.kind}:1b"
    parts = call("pull", name, stream=True)
    assert parts[-1].status == "success"
    assert [p.status for p in parts].count("success") == 1
    assert all(p.total == 2000 for p in parts if p.digest)
    assert name in {m.model for m in call("list").models}
    assert call("pull", name).status == "success"
    for host in fleet.standins:
        assert received(host, "/api/pull") == call.sent[:2]
    assert call("delete", name).status == "success"
    assert name not in tag_names(fleet.url)


def test_push_streams_progress_to_success(call: Caller, fleet: Fleet) -> None:
    parts = call("push", "shared:7b", insecure=True, stream=True)
    assert [p.status for p in parts][-1] == "success"
    assert call("push", "llama3").status == "success"
    a, b = fleet.standins
    assert received(a, "/api/push") == call.sent and received(b, "/api/push") == call.sent[:1]


def test_create_copy_delete(call: Caller, fleet: Fleet) -> None:
    made, twin = f"made-{call.kind}", f"twin-{call.kind}:2b"
    parts = call(
        "create",
        made,
        from_="shared:7b",
        system="be brief",
        template="{{ .Prompt }}",
        parameters={"temperature": 0.1, "stop": ["END"]},
        license="MIT",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
    )
    assert parts[-1].status == "success"
    assert call.sent[0]["parameters"] == {"temperature": 0.1, "stop": ["END"]}
    assert call("copy", made, twin).status == "success"
    assert {f"{made}:latest", twin} <= {m.model for m in call("list").models}
    assert call("generate", model=twin, prompt="x").response == TOKENS
    assert call("delete", made).status == call("delete", twin).status == "success"
    assert not {f"{made}:latest", twin} & tag_names(fleet.url)
    for host in fleet.standins:
        forwarded = [
            body
            for method, path, body in host.requests
            if method != "GET" and path != "/api/generate"
        ]
        assert forwarded == [body for body in call.sent if body.get("prompt") is None]


def test_errors_raise_response_errors(call: Caller, fleet: Fleet) -> None:
    for kwargs in ({}, {"stream": True}):
        with pytest.raises(ollama.ResponseError) as info:
            call("chat", model="nope:1b", messages=USER, **kwargs)
        assert (info.value.status_code, info.value.error) == (404, "model 'nope:1b' not found")
    fleet.standins[0].fail_mid_stream("out of memory", after=2)
    with pytest.raises(ollama.ResponseError) as info:
        call("generate", model="llama3", prompt="x", stream=True)
    assert info.value.error == "out of memory"
    with pytest.raises(ollama.ResponseError) as info:
        call("delete", "nope:1b")
    assert info.value.status_code == 404


def test_create_blob_uploads_to_every_host(call: Caller, fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(f"GGUF from the {call.kind} client".encode())
    digest = call("create_blob", path)
    assert all(host.has_blob(digest) for host in fleet.standins)
    assert call("create_blob", path) == digest  # every host has it: 200, still no error
