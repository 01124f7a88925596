"""Bad input never costs a 5xx: every malformed request is a 4xx in its surface's error shape
(Ollama's ``{"error": "..."}`` on /api, Anthropic's ``{"type": "error", "error": {...}}`` on
/v1/messages, OpenAI's ``{"error": {...}}`` on the rest of /v1), and the gateway keeps
serving afterwards."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from oshepherd.api.errors import install_handlers
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import Component
from oshepherd.testing.fleet import Fleet
from tests.conftest import two_hosts

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

pytestmark = pytest.mark.timeout(60)

GOOD = {"model": "llama3", "prompt": "hi", "stream": False}
DEEP = 5000
SMALL_LIMIT = 4096
DEFAULT_LIMIT = 64 * 1024 * 1024  # MAX_BODY_BYTES unless set, as the README says


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    models = ("llama3", "hf.co/org/repo:Q4_K_M"), ("namespace/model:tag",)
    with two_hosts(redis_server, stack_log, *models) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def http(fleet: Fleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=10) as client:
        yield client


def assert_rejected(response: httpx.Response, path: str) -> None:
    """A 4xx whose JSON body is the error object of ``path``'s surface, and nothing else."""
    content_type = response.headers.get("content-type", "")
    assert_error(response.status_code, content_type, response.content, path)


def assert_error(status: int, content_type: str, content: bytes, path: str) -> None:
    assert 400 <= status < 500, (status, content[:300])
    assert content_type.startswith("application/json"), (content_type, content[:300])
    body = orjson.loads(content)
    if path.startswith("/v1/messages"):  # Ollama's own add a request_id
        assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, body
        assert set(body["error"]) == {"type", "message"}, body
        assert all(isinstance(v, str) and v for v in body["error"].values()), body
        return
    assert list(body) == ["error"], body
    error = body["error"]
    if path.startswith("/v1"):
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
    else:
        assert isinstance(error, str) and error, body


@dataclass(frozen=True)
class Endpoint:
    """A JSON endpoint, a body it accepts, the fields that name its model (aliases: the
    first present wins) and the other fields the gateway itself reads."""

    method: str
    path: str
    good: dict[str, Any]
    names: tuple[str, ...] = ("model",)
    reads: tuple[str, ...] = ()


CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
ENDPOINTS = [
    Endpoint("POST", "/api/generate", GOOD, reads=("stream",)),
    Endpoint("POST", "/api/chat", CHAT, reads=("stream", "messages")),
    Endpoint("POST", "/api/embed", {"model": "llama3", "input": "hi"}, reads=("input",)),
    Endpoint("POST", "/api/embeddings", {"model": "llama3", "prompt": "hi"}),
    Endpoint("POST", "/api/show", {"model": "llama3"}, names=("model", "name")),
    Endpoint("POST", "/api/pull", {"model": "llama3"}, names=("model", "name"), reads=("stream",)),
    Endpoint("POST", "/api/push", {"model": "llama3"}, names=("model", "name"), reads=("stream",)),
    Endpoint("POST", "/api/create", {"model": "mine", "from": "llama3"}, reads=("stream",)),
    Endpoint(
        "POST",
        "/api/copy",
        {"source": "llama3", "destination": "mine"},
        names=("source",),
        reads=("destination",),
    ),
    Endpoint("DELETE", "/api/delete", {"model": "mine"}, names=("model", "name")),
    # /v1 bodies beyond model and stream are Ollama's to check (routes/openai.py).
    Endpoint("POST", "/v1/chat/completions", CHAT, reads=("stream",)),
    Endpoint("POST", "/v1/completions", GOOD, reads=("stream",)),
    Endpoint("POST", "/v1/embeddings", {"model": "llama3", "input": "hi"}),
    Endpoint("POST", "/v1/messages", {**CHAT, "max_tokens": 16}, reads=("stream",)),
    Endpoint("POST", "/v1/responses", {"model": "llama3", "input": "hi"}, reads=("stream",)),
]


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _with(good: dict[str, Any], raw_field: bytes) -> bytes:
    """``good`` with one more member spliced in as raw bytes (which may not be valid JSON)."""
    return orjson.dumps(good)[:-1] + b"," + raw_field + b"}"


def body_cases(good: dict[str, Any]) -> dict[str, bytes]:
    """Bodies that are not a usable JSON object at all."""
    return {
        "not-json": b"{model: llama3",
        "array": b"[]",
        "string": b'"x"',
        "number": b"1",
        "null": b"null",
        "empty": b"",
        "whitespace": b" \n\t",
        "deep-array-body": _nested(DEEP),
        "deep-object-body": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
        "deep-field": _with(good, b'"options":' + _nested(DEEP)),
        "invalid-utf8": _with(good, b'"prompt":"\xff\xfe\xc3"'),
        "lone-surrogate": _with(good, b'"prompt":"\\ud800"'),
        "nan": _with(good, b'"temperature":NaN'),
        "bom": b"\xef\xbb\xbf" + orjson.dumps(good),
    }


WRONG_TYPES: dict[str, Any] = {
    "number": 1,
    "list": ["llama3"],
    "object": {"name": "llama3"},
    "bool": True,
}
BAD_NAMES = {
    "nul": "llama3\x00",
    "control": "lla\x07ma3",
    "newline": "llama3\n",
    "escape": "\x1b[31mllama3",
    "long": "m" * 5000,
    "padded": " llama3 ",
}
FIELD_CASES: dict[str, dict[str, Any]] = {
    "destination": {**WRONG_TYPES, **BAD_NAMES},
    "stream": {"string": "yes", "number": 1},
    "messages": {"string": "hi", "object": {"role": "user"}, "non-objects": ["hi", 1]},
    "input": {"number": 1, "non-strings": ["a", 1], "object": {"a": "b"}},
}


def field_cases(endpoint: Endpoint) -> dict[str, bytes]:
    """``endpoint``'s good body with one field the gateway reads made wrong."""
    cases: dict[str, bytes] = {}
    others = {k: v for k, v in endpoint.good.items() if k not in endpoint.names}
    for name_field in endpoint.names:
        for label, value in {**WRONG_TYPES, **BAD_NAMES}.items():
            cases[f"{name_field}-{label}"] = orjson.dumps({**others, name_field: value})
    for read in endpoint.reads:
        for label, value in FIELD_CASES[read].items():
            cases[f"{read}-{label}"] = orjson.dumps({**endpoint.good, read: value})
    return cases


def corpus() -> list[Any]:
    return [
        pytest.param(endpoint.method, endpoint.path, body, id=f"{endpoint.path}:{label}")
        for endpoint in ENDPOINTS
        for label, body in {**body_cases(endpoint.good), **field_cases(endpoint)}.items()
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "body"), corpus())
def test_bad_bodies_are_rejected(http: httpx.Client, method: str, path: str, body: bytes) -> None:
    assert_rejected(http.request(method, path, content=body), path)


TRANSCRIBE = "/v1/audio/transcriptions"


def _form(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    """A multipart body and its Content-Type, as httpx (and the openai SDK) write them."""
    request = httpx.Request("POST", "http://gateway", data=fields, files=files)
    return request.read(), request.headers["content-type"]


AUDIO = {"file": b"RIFF\x24\x00\x00\x00WAVEfmt \xff\xfe"}
FORM, FORM_TYPE = _form({"model": "llama3"}, AUDIO)
FORM_CASES: dict[str, tuple[bytes, str]] = {
    "no-content-type": (FORM, ""),
    "json": (b'{"model": "llama3"}', "application/json"),
    "urlencoded": (b"model=llama3", "application/x-www-form-urlencoded"),
    "no-boundary": (FORM, "multipart/form-data"),
    "other-boundary": (FORM, "multipart/form-data; boundary=other"),
    "garbage": (b"\xff" * 64, FORM_TYPE),
    "empty": (b"", FORM_TYPE),
    "truncated": (FORM[: len(FORM) // 2], FORM_TYPE),
    "no-closing-boundary": (FORM[: FORM.rindex(b"--\r\n")], FORM_TYPE),
    "long-boundary": (  # python-multipart refuses boundaries over 256 bytes
        b"--" + b"b" * 257 + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        b"llama3\r\n--" + b"b" * 257 + b"--\r\n",
        "multipart/form-data; boundary=" + "b" * 257,
    ),
    "no-model": _form({}, AUDIO),
    "empty-model": _form({"model": ""}, AUDIO),
    **{f"model-{label}": _form({"model": name}, AUDIO) for label, name in BAD_NAMES.items()},
    "unknown-model": _form({"model": "nope:1b"}, AUDIO),
    # Ollama's checks (TranscriptionMiddleware), relayed as it answers them.
    "no-file": _form({"model": "llama3"}, {}),
    "empty-file": _form({"model": "llama3"}, {"file": b""}),
}


@pytest.mark.slow
@pytest.mark.parametrize(("content", "content_type"), FORM_CASES.values(), ids=list(FORM_CASES))
def test_bad_uploads_are_rejected(http: httpx.Client, content: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    assert_rejected(http.post(TRANSCRIBE, content=content, headers=headers), TRANSCRIBE)


ROUTING = [
    ("GET", "/api/generate", 405),
    ("GET", "/api/generate/", 405),
    ("DELETE", "/api/chat", 405),
    ("PUT", "/api/embed", 405),
    ("POST", "/api/tags", 405),
    ("PATCH", "/", 405),
    ("GET", "/api/nope", 404),
    ("POST", "/api/nope", 404),
    ("GET", "/nope", 404),
    ("GET", "/api", 404),
    ("GET", "/v1/nope", 404),
    ("POST", "/v1", 404),
    ("GET", "/v1/chat/completions", 405),
    ("GET", "/v1/messages", 405),
    ("POST", "/v1/messages/count_tokens", 404),
    ("GET", "/v1/responses", 405),
    ("GET", "/v1/audio/transcriptions", 405),
    ("GET", "/v1/models/%FF%FE", 404),
    ("GET", "/v1/models/llama3%00", 404),
    ("GET", "/v1/models/%1B%5B31m", 404),
    ("GET", "/v1/models/" + "m" * 5000, 404),
    ("GET", "/api/%FF", 404),
    ("POST", "/api/blobs/sha256:not-hex", 400),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "status"), ROUTING)
def test_unknown_paths_and_wrong_methods(
    http: httpx.Client, method: str, path: str, status: int
) -> None:
    response = http.request(method, path, content=b"{}")
    assert_rejected(response, path)
    assert response.status_code == status
    if response.status_code == 405:
        assert response.headers["allow"]


def _padded(size: int) -> bytes:
    """A good generate body of exactly ``size`` bytes."""
    bare = orjson.dumps({**GOOD, "pad": ""})
    return orjson.dumps({**GOOD, "pad": "x" * (size - len(bare))})


@pytest.fixture(scope="module")
def small_api(fleet: Fleet) -> Iterator[Component]:
    """A second API on the same fleet, with a small body limit."""
    api = fleet.stack.start_api(max_body_bytes=SMALL_LIMIT)
    yield api
    api.stop()


@pytest.mark.slow
def test_an_api_with_default_settings_reads_64_mib_and_refuses_a_byte_more(
    fleet: Fleet, http: httpx.Client
) -> None:
    blank = http.post("/api/generate", content=b" " * DEFAULT_LIMIT)
    assert blank.status_code == 400, blank.text  # read to the end: there is no JSON in it
    assert _status_of_declared_body(fleet.url, DEFAULT_LIMIT + 1) == 413


def _status_of_declared_body(url: str, length: int) -> int:
    """The status answered to a generate that declares ``length`` bytes of body and sends
    none of them (httpx would send the body before reading the answer)."""
    address = httpx.URL(url)
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: {address.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    with socket.create_connection((address.host, address.port or 80), timeout=10) as sock:
        sock.sendall(head.encode())
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


@pytest.mark.slow
def test_a_body_at_the_limit_is_served(small_api: Component) -> None:
    response = httpx.post(small_api.url + "/api/generate", content=_padded(SMALL_LIMIT))
    assert response.status_code == 200, response.text
    assert response.json()["done"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        "/api/generate",
        "/api/embed",
        "/api/pull",
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/responses",
    ],
)
def test_an_oversized_body_with_content_length_is_413(small_api: Component, path: str) -> None:
    response = httpx.post(small_api.url + path, content=_padded(SMALL_LIMIT + 1))
    assert_rejected(response, path)
    assert response.status_code == 413


@pytest.mark.slow
def test_a_body_over_the_limit_once_decompressed_is_413(small_api: Component) -> None:
    bomb = zstd.compress(_padded(64 * SMALL_LIMIT))
    assert len(bomb) < SMALL_LIMIT
    headers = {"content-encoding": "zstd"}
    response = httpx.post(small_api.url + "/v1/responses", content=bomb, headers=headers)
    assert_rejected(response, "/v1/responses")
    assert response.status_code == 413


@pytest.mark.slow
def test_an_oversized_upload_is_413(small_api: Component) -> None:
    files = {"file": ("a.wav", b"\0" * SMALL_LIMIT, "audio/wav")}
    response = httpx.post(small_api.url + TRANSCRIBE, data={"model": "llama3"}, files=files)
    assert_rejected(response, TRANSCRIBE)
    assert response.status_code == 413


@pytest.mark.slow
def test_an_oversized_chunked_body_is_413(small_api: Component) -> None:
    body = _padded(3 * SMALL_LIMIT)
    chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
    request = httpx.Request("POST", small_api.url + "/api/generate", content=chunks)
    assert "content-length" not in request.headers
    with httpx.Client() as client:
        response = client.send(request)
    assert_rejected(response, "/api/generate")
    assert response.status_code == 413


NAMES = [
    ("hf.co/org/repo:Q4_K_M", 0),
    ("HF.CO/Org/Repo:q4_k_m", 0),
    ("namespace/model:tag", 1),
    ("NameSpace/Model:TAG", 1),
    ("LLAMA3", 0),
    ("llama3:LATEST", 0),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "host"), NAMES)
def test_names_of_every_form_route_and_are_echoed(
    fleet: Fleet, http: httpx.Client, name: str, host: int
) -> None:
    for standin in fleet.standins:
        standin.reset_counters()
    response = http.post("/api/generate", json={**GOOD, "model": name})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == name
    assert [s.count("/api/generate") for s in fleet.standins] == [int(i == host) for i in range(2)]


@pytest.mark.slow
def test_still_serving_after_the_corpus(fleet: Fleet, http: httpx.Client) -> None:
    response = http.post("/api/generate", json=GOOD)
    assert (
        response.status_code == 200 and response.json()["response"] == "tok0 tok1 tok2 tok3 tok4 "
    )
    assert fleet.api is not None and fleet.api.alive()
    assert all(c.alive() for c in fleet.stack.components)


def _handlers_app() -> FastAPI:
    """The gateway's error handlers on routes that fail in the ways FastAPI itself reports."""
    app = FastAPI()
    install_handlers(app)

    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    async def broken() -> None:
        raise RuntimeError("a bug")

    for prefix in ("/api", "/v1"):
        app.add_api_route(prefix + "/typed", typed)
        app.add_api_route(prefix + "/broken", broken)
    return app


@pytest.mark.parametrize("prefix", ["/api", "/v1"])
def test_framework_errors_come_out_in_the_surface_shape(prefix: str) -> None:
    with TestClient(_handlers_app(), raise_server_exceptions=False) as client:
        invalid = client.get(prefix + "/typed", params={"n": "x"})
        content_type = invalid.headers["content-type"]
        assert_error(invalid.status_code, content_type, invalid.content, prefix + "/typed")
        assert invalid.status_code == 400 and "'n'" in invalid.text
        broken = client.get(prefix + "/broken")
    assert broken.status_code == 500
    assert broken.headers["content-type"].startswith("application/json")
    error = broken.json()["error"]
    assert (error["message"] if prefix == "/v1" else error) == "internal error"


@pytest.mark.slow
@pytest.mark.parametrize("keep_alive", [1e308, -1e308, 10**30, "9" * 400 + "s", "2562048h"])
@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_an_extreme_keep_alive_is_read_as_ollama_reads_it(
    http: httpx.Client, path: str, keep_alive: Any
) -> None:
    """The gateway reads keep_alive to tell a load or unload: a number past int64
    nanoseconds means forever (a load), a duration string past it is Ollama's 400."""
    response = http.post(path, json={"model": "llama3", "keep_alive": keep_alive})
    if isinstance(keep_alive, str):
        assert_rejected(response, path)
    else:
        assert response.status_code == 200 and response.json()["done_reason"] == "load"
