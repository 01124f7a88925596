"""Anthropic's surface (/v1/messages, what Claude Code speaks) through the official anthropic
SDK, a Claude Code-shaped raw request, and the gateway's own errors in Anthropic's shape."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import IO, Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam, TextBlock, ToolParam, ToolUseBlock

from oshepherd.api.errors import error_body, error_line
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet
from tests.conftest import one_host

TEXT = "tok0 tok1 tok2 tok3 tok4 "
HELLO: list[MessageParam] = [{"role": "user", "content": "hello"}]
SYSTEM: list[Any] = [
    {"type": "text", "text": "You are Claude Code."},
    {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
]
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
EVENTS = [
    "message_start",
    "content_block_start",
    *["content_block_delta"] * 5,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with one_host(redis_server, stack_log, "llama3") as fleet:
        yield fleet


@pytest.fixture
def client(fleet: Fleet) -> Iterator[anthropic.Anthropic]:
    for host in fleet.standins:
        host.reset_counters()
    # The host without /v1, as Claude Code's ANTHROPIC_BASE_URL; no retries: a 5xx surfaces.
    with anthropic.Anthropic(base_url=fleet.url, api_key="unused", max_retries=0) as c:
        yield c


def last_request(fleet: Fleet, path: str) -> dict[str, Any]:
    """The body of the last request to ``path`` the fleet's host received."""
    return [body for _, p, body in list(fleet.standins[0].requests) if p == path][-1]


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` of each SSE event in ``text``; every event names itself twice."""
    events = []
    for chunk in text.split("\n\n")[:-1]:
        name_line, data_line = chunk.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name, chunk
        events.append((name, data))
    return events


@pytest.mark.slow
def test_create_with_system_blocks(client: anthropic.Anthropic, fleet: Fleet) -> None:
    message = client.messages.create(model="llama3", max_tokens=64, system=SYSTEM, messages=HELLO)
    assert [block.type for block in message.content] == ["text"]
    assert isinstance(message.content[0], TextBlock) and message.content[0].text == TEXT
    assert (message.model, message.role, message.stop_reason) == ("llama3", "assistant", "end_turn")
    assert message.usage.output_tokens == 5
    body = last_request(fleet, "/v1/messages")
    assert (body["system"], body["max_tokens"]) == (SYSTEM, 64)


@pytest.mark.slow
def test_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="llama3", max_tokens=64, messages=HELLO) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert [kind for kind in kinds if kind != "text"] == EVENTS
    assert isinstance(final.content[0], TextBlock) and final.content[0].text == TEXT
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_comes_back(client: anthropic.Anthropic, streamed: bool) -> None:
    kwargs: dict[str, Any] = {"model": "llama3", "max_tokens": 64, "messages": HELLO}
    if streamed:
        with client.messages.stream(**kwargs, tools=[WEATHER]) as stream:
            message = stream.get_final_message()
    else:
        message = client.messages.create(**kwargs, tools=[WEATHER])
    assert [block.type for block in message.content] == ["text", "tool_use"]
    call = message.content[1]
    assert isinstance(call, ToolUseBlock)
    assert (call.name, call.input) == ("get_weather", {"x": 1}) and call.id.startswith("call_")
    assert message.stop_reason == "tool_use"
    # The answer to the call goes back as a tool_result block, and the chat goes on.
    follow_up: list[MessageParam] = [
        *HELLO,
        {"role": "assistant", "content": message.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
        },
    ]
    reply = client.messages.create(model="llama3", max_tokens=64, messages=follow_up)
    assert isinstance(reply.content[0], TextBlock) and reply.content[0].text == TEXT


@pytest.mark.slow
def test_a_claude_code_shaped_request_streams_through(fleet: Fleet) -> None:
    """What Claude Code sends with ANTHROPIC_BASE_URL set to the gateway: its headers,
    system blocks with cache control, tools, a stream; the events arrive in Ollama's order."""
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-api-key": "unused",
        "authorization": "Bearer unused",
        "x-app": "cli",
        "user-agent": "claude-cli/2.0.0 (external, cli)",
    }
    body = {
        "model": "llama3",
        "max_tokens": 32000,
        "stream": True,
        "system": SYSTEM,
        "tools": [WEATHER],
        "metadata": {"user_id": "user_abc"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "weather?"}]}],
    }
    response = httpx.post(fleet.url + "/v1/messages", json=body, headers=headers, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[: 2 + 5] == EVENTS[: 2 + 5] and names[-2:] == ["message_delta", "message_stop"]
    blocks = [
        data["content_block"]["type"] for name, data in events if name == "content_block_start"
    ]
    assert blocks == ["text", "tool_use"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert last_request(fleet, "/v1/messages") == body  # relayed as sent


@pytest.mark.slow
def test_unknown_model_is_an_anthropic_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nope:1b", max_tokens=8, messages=HELLO)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'nope:1b' not found"},
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "invalid JSON"),
        (b"", "missing request body"),
        (b'{"max_tokens": 8, "messages": []}', "model is required"),
        (b'{"model": "llama3", "max_tokens": 8, "stream": "yes"}', "'stream'"),
        # Ollama's own checks (middleware/anthropic.go), relayed as it answers them.
        (b'{"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}', "max_tokens"),
        (b'{"model": "llama3", "max_tokens": 8, "messages": []}', "messages is required"),
    ],
)
def test_bad_requests_get_anthropic_shaped_400s(fleet: Fleet, body: bytes, error: str) -> None:
    response = httpx.post(fleet.url + "/v1/messages", content=body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert error in answer["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("GET", "/v1/messages", 405, "invalid_request_error"),
        ("POST", "/v1/messages/count_tokens", 404, "not_found_error"),
    ],
)
def test_framework_errors_take_anthropic_shape(
    fleet: Fleet, method: str, path: str, status: int, kind: str
) -> None:
    response = httpx.request(method, fleet.url + path, json={"model": "llama3"})
    assert response.status_code == status
    answer = response.json()
    assert answer["type"] == "error" and answer["error"]["type"] == kind
    assert set(answer) == {"type", "error"} and set(answer["error"]) == {"type", "message"}


@pytest.mark.slow
def test_ollama_errors_pass_through(client: anthropic.Anthropic, fleet: Fleet) -> None:
    fleet.standins[0].fail_next(500, "llama runner process has terminated")
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(model="llama3", max_tokens=8, messages=HELLO)
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"] == {
        "type": "api_error",
        "message": "llama runner process has terminated",
    }


@pytest.mark.slow
def test_a_host_lost_mid_stream_ends_with_an_anthropic_error_event(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    host = fleet.standin("llama3", tokens=400, token_delay=0.02)
    fleet.start_api()
    fleet.worker(host)
    fleet.wait_for_models("llama3:latest")
    client = anthropic.Anthropic(base_url=fleet.url, api_key="unused", max_retries=0)
    seen: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(model="llama3", max_tokens=512, messages=HELLO) as stream,
    ):
        for event in stream:
            seen.append(event.type)
            if event.type == "text":
                host.stop()  # the stream is under way
    assert seen[0] == "message_start" and "message_stop" not in seen
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "error"
    error = info.value.body["error"]
    assert error["type"] == "api_error" and "Ollama stream broke" in error["message"]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_types_follow_anthropics_table(status: int, kind: str) -> None:
    body = json.loads(error_body("/v1/messages", status, "m"))
    assert body == {"type": "error", "error": {"type": kind, "message": "m"}}


def test_a_failure_mid_stream_is_an_anthropic_error_event() -> None:
    line = error_line("/v1/messages", "gone", sse=True)
    assert line.startswith(b"event: error\ndata: ") and line.endswith(b"\n\n")
    assert sse_events(line.decode()) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "gone"}})
    ]
    # The rest of /v1 keeps OpenAI's shape.
    assert json.loads(error_body("/v1/chat/completions", 404, "m"))["error"]["type"] == (
        "not_found_error"
    )
