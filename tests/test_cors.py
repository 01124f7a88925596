"""CORS as Ollama does it: local pages and app shells by default, more via OLLAMA_ORIGINS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO

import httpx
import pytest

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet
from tests.conftest import new_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ALLOWED = [
    "http://localhost:3000",
    "https://localhost",
    "http://127.0.0.1:8080",
    "https://0.0.0.0:443",
    "app://obsidian.md",
    "file://",
    "tauri://localhost",
    "vscode-webview://1a2b3c",
]
REFUSED = [
    "https://evil.example",
    "http://localhost.evil.example",
    "http://192.168.1.20:3000",
    "null",
]


def preflight(url: str, origin: str, path: str = "/api/chat") -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization,x-stainless-os",
    }
    return httpx.options(url + path, headers=headers)


def allowed(url: str, origin: str) -> bool:
    response = preflight(url, origin)
    granted: bool = response.headers.get("access-control-allow-origin") == origin
    assert granted == (response.status_code == 200)
    return granted


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[str]:
    fleet = new_fleet(redis_server, stack_log)
    fleet.start_api()
    yield fleet.url
    fleet.stop()


@pytest.mark.parametrize("origin", ALLOWED)
def test_default_origins_are_allowed(api: str, origin: str) -> None:
    assert allowed(api, origin)


@pytest.mark.parametrize("origin", REFUSED)
def test_other_origins_are_refused(api: str, origin: str) -> None:
    assert not allowed(api, origin)


def test_preflight_grants_the_method_and_the_sdk_headers(api: str) -> None:
    response = preflight(api, "http://localhost:5173", "/v1/chat/completions")
    assert response.status_code == 200
    assert "POST" in response.headers["access-control-allow-methods"]
    assert (
        response.headers["access-control-allow-headers"]
        == "content-type,authorization,x-stainless-os"
    )


def test_simple_requests_carry_the_header_only_for_allowed_origins(api: str) -> None:
    ok = httpx.get(api + "/api/version", headers={"Origin": "http://localhost:3000"})
    assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    refused = httpx.get(api + "/api/version", headers={"Origin": "https://evil.example"})
    assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers
    # Errors too: a browser app must be able to read why it failed.
    missing = httpx.post(
        api + "/api/generate", json={"model": "nope"}, headers={"Origin": "app://x"}
    )
    assert (
        missing.status_code == 404 and missing.headers["access-control-allow-origin"] == "app://x"
    )


def test_ollama_origins_add_to_the_defaults(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    fleet.start_api(ollama_origins="https://app.example, chrome-extension://*")
    assert allowed(fleet.url, "https://app.example")
    assert allowed(fleet.url, "chrome-extension://abcdefgh")
    assert allowed(fleet.url, "http://localhost:3000")
    assert not allowed(fleet.url, "https://evil.example")
    assert not allowed(fleet.url, "https://app.example.evil.example")


def test_a_star_allows_every_origin(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    fleet.start_api(ollama_origins="*")
    assert allowed(fleet.url, "https://evil.example")
