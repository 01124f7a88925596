"""The OpenAI-compatible surface (/v1) through the official openai SDK."""

from __future__ import annotations

import io
import json
import math
import sys
import wave
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import IO

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet
from tests.conftest import one_host

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

TEXT = "tok0 tok1 tok2 tok3 tok4 "
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
TRANSCRIBE = "/v1/audio/transcriptions"
_FORM = httpx.Request(
    "POST", "http://gateway" + TRANSCRIBE, data={"model": "llama3"}, files={"file": b"RIFF\xff"}
)
FORM, FORM_TYPE = _FORM.read(), _FORM.headers["content-type"]


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with one_host(redis_server, stack_log, "llama3", "someone/custom:1b") as fleet:
        yield fleet


@pytest.fixture
def client(fleet: Fleet) -> Iterator[openai.OpenAI]:
    for host in fleet.standins:
        host.reset_counters()
    # No retries: a 5xx must surface, not be re-sent.
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="ollama", max_retries=0) as c:
        yield c


def test_chat(client: openai.OpenAI, fleet: Fleet) -> None:
    reply = client.chat.completions.create(model="llama3", messages=HELLO)
    assert reply.choices[0].message.content == TEXT
    assert reply.choices[0].finish_reason == "stop"
    assert (
        reply.model == "llama3" and reply.usage is not None and reply.usage.completion_tokens == 5
    )
    assert fleet.standins[0].count("/v1/chat/completions") == 1


def test_chat_streaming(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="llama3",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices]
    assert deltas == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 ", ""]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


def test_chat_stream_ends_with_done_event(fleet: Fleet) -> None:
    body = {"model": "llama3", "messages": HELLO, "stream": True}
    response = httpx.post(fleet.url + "/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])


def test_stream_defaults_to_false(fleet: Fleet) -> None:
    response = httpx.post(
        fleet.url + "/v1/chat/completions", json={"model": "llama3", "messages": HELLO}
    )
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["object"] == "chat.completion"


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="llama3", prompt="hi")
    assert reply.choices[0].text == TEXT and reply.object == "text_completion"
    streamed = client.completions.create(model="llama3", prompt="hi", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == TEXT


def test_embeddings_match_the_native_ones(client: openai.OpenAI, fleet: Fleet) -> None:
    reply = client.embeddings.create(model="llama3", input=["a", "b"])
    native = httpx.post(
        fleet.url + "/api/embed", json={"model": "llama3", "input": ["a", "b"]}
    ).json()
    assert [d.index for d in reply.data] == [0, 1]
    assert [d.embedding for d in reply.data] == native["embeddings"]
    assert reply.usage.prompt_tokens == 2


def test_responses(client: openai.OpenAI, fleet: Fleet) -> None:
    reply = client.responses.create(model="llama3", input="hello there", instructions="Be brief.")
    assert reply.output_text == TEXT and reply.status == "completed"
    assert reply.model == "llama3" and reply.instructions == "Be brief."
    assert reply.usage is not None and reply.usage.output_tokens == 5
    assert fleet.standins[0].count("/v1/responses") == 1


def test_responses_streaming(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="llama3", input="hello", stream=True))
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.output_text == TEXT


def test_a_zstd_compressed_responses_request_as_codex_sends_it(fleet: Fleet) -> None:
    request = {"model": "llama3", "input": "hello", "stream": True}
    headers = {"content-encoding": "zstd", "content-type": "application/json"}
    compressed = zstd.compress(orjson.dumps(request))
    response = httpx.post(fleet.url + "/v1/responses", content=compressed, headers=headers)
    assert response.status_code == 200 and response.text.endswith("\n\n")
    assert "event: response.completed" in response.text
    received = [body for _, path, body in fleet.standins[0].requests if path == "/v1/responses"]
    assert received[-1] == request  # decompressed on the way
    for bad in (b"not zstd", compressed[:-4]):
        refused = httpx.post(fleet.url + "/v1/responses", content=bad, headers=headers)
        assert refused.status_code == 400
        assert "failed to decompress zstd body" in refused.json()["error"]["message"]


def wav(seconds: float = 0.25, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV file of a 440 Hz tone: bytes that are neither UTF-8 nor JSON."""
    frames = int(seconds * rate)
    samples = (int(12_000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(frames))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
    return buffer.getvalue()


def test_transcription_carries_the_audio_byte_for_byte(client: openai.OpenAI, fleet: Fleet) -> None:
    audio = wav()
    reply = client.audio.transcriptions.create(
        model="llama3", file=("hello.wav", audio, "audio/wav"), language="en"
    )
    assert reply.text == TEXT.strip()
    received = [body for _, path, body in fleet.standins[0].requests if path == TRANSCRIBE]
    assert received[-1]["file"] == audio  # binary-safe through Redis and the worker
    assert (received[-1]["model"], received[-1]["language"]) == ("llama3", "en")
    text = client.audio.transcriptions.create(
        model="llama3", file=("hello.wav", audio), response_format="text"
    )
    assert text == TEXT.strip()


@pytest.mark.parametrize(
    ("content", "content_type", "error"),
    [
        (b'{"model": "llama3"}', "application/json", "isn't multipart/form-data"),
        (b"", "multipart/form-data", "isn't multipart/form-data"),  # no boundary
        (b"garbage", "multipart/form-data; boundary=b", "failed to parse multipart form"),
        (FORM[: len(FORM) // 2], FORM_TYPE, "failed to parse multipart form"),
        (FORM.replace(b'name="model"', b'name="other"'), FORM_TYPE, "model is required"),
        # Ollama's own checks (middleware/openai.go), relayed as it answers them.
        (FORM.replace(b'name="file"', b'name="other"'), FORM_TYPE, "file is required"),
    ],
)
def test_bad_transcription_requests_get_openai_shaped_400s(
    fleet: Fleet, content: bytes, content_type: str, error: str
) -> None:
    headers = {"content-type": content_type}
    response = httpx.post(fleet.url + TRANSCRIBE, content=content, headers=headers)
    assert response.status_code == 400, response.text
    detail = response.json()["error"]
    assert detail["type"] == "invalid_request_error" and error in detail["message"]


def test_models_list_and_retrieve(client: openai.OpenAI, fleet: Fleet) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert sorted(listed) == ["llama3:latest", "someone/custom:1b"]
    assert listed["llama3:latest"].owned_by == "library"
    assert listed["someone/custom:1b"].owned_by == "someone"
    tags = httpx.get(fleet.url + "/api/tags").json()["models"]
    modified = datetime.fromisoformat(tags[0]["modified_at"]).timestamp()
    assert listed[tags[0]["name"]].created == int(modified) > 0
    assert listed["llama3:latest"].object == "model"
    one = client.models.retrieve("someone/custom:1b")
    assert (one.id, one.owned_by) == ("someone/custom:1b", "someone")
    assert client.models.retrieve("LLAMA3").id == "LLAMA3"  # echoed as asked, matched like Ollama
    # Ollama's default host and namespace: the same model (types/model/name.go)
    assert client.models.retrieve("registry.ollama.ai/library/llama3").owned_by == "library"
    chat = client.chat.completions.create(
        model="library/llama3", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.model == "library/llama3"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as retrieved:
        client.models.retrieve("nope:1b")
    assert retrieved.value.body == {
        "message": "model 'nope:1b' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.NotFoundError) as chatted:
        client.chat.completions.create(model="nope:1b", messages=HELLO)
    assert "model 'nope:1b' not found" in chatted.value.message


def test_stream_must_be_a_boolean(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="llama3", messages=HELLO, extra_body={"stream": "yes"})
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"
    assert "'stream'" in info.value.body["message"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "invalid JSON"),
        (b"", "missing request body"),
        (b'{"messages": []}', "model is required"),
        (b'{"name": "llama3", "messages": []}', "model is required"),  # no "name" alias on /v1
        (b'{"model": ["llama3"]}', "invalid model name"),
    ],
)
def test_bad_requests_get_openai_shaped_400s(fleet: Fleet, body: bytes, error: str) -> None:
    response = httpx.post(fleet.url + "/v1/chat/completions", content=body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["error"]
    assert error in detail["message"]
    assert {k: v for k, v in detail.items() if k != "message"} == {
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_unknown_v1_path_is_an_openai_404(fleet: Fleet) -> None:
    response = httpx.post(fleet.url + "/v1/nothing", json={"model": "llama3"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_ollama_errors_pass_through(client: openai.OpenAI, fleet: Fleet) -> None:
    fleet.standins[0].fail_next(500, "llama runner process has terminated")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="llama3", messages=HELLO)
    assert info.value.body == {
        "message": "llama runner process has terminated",
        "type": "api_error",
        "param": None,
        "code": None,
    }


def test_mid_stream_errors_pass_through(client: openai.OpenAI, fleet: Fleet) -> None:
    fleet.standins[0].fail_mid_stream("out of memory", after=2)
    stream = client.chat.completions.create(model="llama3", messages=HELLO, stream=True)
    seen: list[str | None] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["tok0 ", "tok1 "]
    assert "out of memory" in info.value.message


def test_a_host_lost_mid_stream_ends_with_an_openai_error_event(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    host = fleet.standin("llama3", tokens=400, token_delay=0.02)
    fleet.start_api()
    fleet.worker(host)
    fleet.wait_for_models("llama3:latest")
    body = {"model": "llama3", "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST", fleet.url + "/v1/chat/completions", json=body, timeout=30
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")  # the stream is under way
        host.stop()
        events = [line for line in lines if line]
    assert events[-1].startswith("data: ")
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["type"] == "api_error" and "Ollama stream broke" in error["message"]
