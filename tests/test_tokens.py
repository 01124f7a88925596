"""Token counting per surface (``oshepherd.tokens``), on the stand-in's answers, which follow
Ollama's shapes: each answer is fed whole and in small pieces (a key cut by a chunk boundary
still counts), and an OpenAI stream probed for its usage reaches the client unchanged."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import orjson
import pytest

from oshepherd.testing.standin import StandIn
from oshepherd.tokens import Counts, TokenMeter, UsageProbe

PROMPT = "why is the sky blue"  # five words: the stand-in's prompt tokens
TOKENS = 5  # the stand-in's completion tokens
MESSAGES = [{"role": "user", "content": PROMPT}]


def answer(path: str, body: dict[str, Any]) -> bytes:
    """The stand-in's answer to ``body`` on ``path``, served in-process."""

    async def ask() -> bytes:
        transport = httpx.ASGITransport(app=StandIn(["llama3"], tokens=TOKENS).app)
        async with httpx.AsyncClient(transport=transport, base_url="http://standin") as client:
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            return response.content

    return asyncio.run(ask())


def metered(path: str, raw: bytes, piece: int) -> Counts:
    meter = TokenMeter.for_path(path)
    assert meter is not None
    for at in range(0, len(raw), piece):
        meter.feed(raw[at : at + piece])
    return meter.counts()


CASES = [
    ("/api/generate", {"prompt": PROMPT}, (5, TOKENS)),
    ("/api/generate", {"prompt": PROMPT, "stream": False}, (5, TOKENS)),
    ("/api/chat", {"messages": MESSAGES}, (5, TOKENS)),
    ("/api/chat", {"messages": MESSAGES, "stream": False}, (5, TOKENS)),
    ("/api/embed", {"input": ["a", "b", "c"]}, (3, 0)),
    ("/v1/chat/completions", {"messages": MESSAGES}, (5, TOKENS)),
    (
        "/v1/chat/completions",
        {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
        (5, TOKENS),
    ),
    ("/v1/completions", {"prompt": PROMPT}, (5, TOKENS)),
    (
        "/v1/completions",
        {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}},
        (5, TOKENS),
    ),
    ("/v1/embeddings", {"input": ["a", "b"]}, (2, 0)),
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 9}, (5, TOKENS)),
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 9, "stream": True}, (5, TOKENS)),
    ("/v1/responses", {"input": PROMPT}, (5, TOKENS)),
    ("/v1/responses", {"input": PROMPT, "stream": True}, (5, TOKENS)),
]


@pytest.mark.parametrize(("path", "body", "expected"), CASES)
def test_counts_per_surface(path: str, body: dict[str, Any], expected: tuple[int, int]) -> None:
    raw = answer(path, {"model": "llama3", **body})
    for piece in (len(raw), 7, 1):
        counts = metered(path, raw, piece)
        assert (counts.prompt, counts.completion) == expected, (piece, raw)


def test_native_carries_eval_duration() -> None:
    raw = answer("/api/generate", {"model": "llama3", "prompt": PROMPT})
    final = orjson.loads(raw.splitlines()[-1])
    assert metered("/api/generate", raw, 3).eval_duration == final["eval_duration"] > 0


def test_no_meter_where_ollama_counts_nothing() -> None:
    assert TokenMeter.for_path("/api/embeddings") is None
    assert TokenMeter.for_path("/v1/audio/transcriptions") is None
    assert TokenMeter.for_path("/api/show") is None


def test_a_key_inside_a_string_does_not_count() -> None:
    meter = TokenMeter.for_path("/api/chat")
    assert meter is not None
    meter.feed(b'{"message":{"content":"\\"eval_count\\":99"},"done":false}\n')
    assert meter.counts() == Counts()


def _same(raw: bytes) -> bytes:
    """``raw`` without what differs between two answers of the stand-in (ids, times)."""
    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', b"", raw)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "stream": True}),
        ("/v1/completions", {"prompt": PROMPT, "stream": True}),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": False}},
        ),
    ],
)
def test_probe_counts_a_stream_without_usage_and_restores_its_bytes(
    path: str, body: dict[str, Any]
) -> None:
    request = orjson.dumps({"model": "llama3", **body})
    plain = answer(path, orjson.loads(request))
    assert b'"usage"' not in plain
    probe = UsageProbe.for_request(path, request)
    assert probe is not None
    probed = answer(path, orjson.loads(probe.body))
    assert b'"usage"' in probed
    for piece in (len(probed), 11, 1):
        probe = UsageProbe.for_request(path, request)
        assert probe is not None
        meter = TokenMeter.for_path(path)
        assert meter is not None
        out = b""
        for at in range(0, len(probed), piece):
            chunk = probed[at : at + piece]
            meter.feed(chunk)
            out += probe.filter(chunk)
        out += probe.rest()
        assert _same(out) == _same(plain), piece
        assert (meter.counts().prompt, meter.counts().completion) == (5, TOKENS)


@pytest.mark.parametrize(
    "body",
    [
        {"stream": True, "stream_options": {"include_usage": True}},  # has it already
        {"stream": False},
        {},  # not a stream: the body has the usage
        {"stream": True, "stream_options": "yes"},  # Ollama's 400, untouched
    ],
)
def test_no_probe_when_not_needed(body: dict[str, Any]) -> None:
    raw = orjson.dumps({"model": "llama3", "messages": MESSAGES, **body})
    assert UsageProbe.for_request("/v1/chat/completions", raw) is None
    assert UsageProbe.for_request("/api/chat", raw) is None
    assert UsageProbe.for_request("/v1/chat/completions", b"not json") is None
