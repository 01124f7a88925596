"""CORS as Ollama does it (gin-contrib/cors in server/routes.go): local pages and app shells by
default, more via OLLAMA_ORIGINS; any other origin gets 403 and nothing runs."""

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
    # Ollama's FAQ: extensions need OLLAMA_ORIGINS (AllowBrowserExtensions allows none).
    "chrome-extension://abcdefgh",
]
# Ollama's AllowHeaders (server/routes.go), then the gateway's own features' headers.
GRANTED_HEADERS = {
    "authorization",
    "content-type",
    "user-agent",
    "accept",
    "x-requested-with",
    "openai-beta",
    "x-stainless-os",
    "x-stainless-retry-count",
    "x-stainless-timeout",
    "x-api-key",
    "anthropic-version",
    "x-request-id",
    "x-oshepherd-priority",
}


def preflight(url: str, origin: str, path: str = "/api/chat") -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization,x-stainless-os",
    }
    return httpx.options(url + path, headers=headers)


def allowed(url: str, origin: str) -> bool:
    """Whether a preflight from ``origin`` is granted: 204 with the origin echoed, else 403
    with an empty body and no CORS header (gin-contrib/cors's two answers)."""
    response = preflight(url, origin)
    granted: bool = response.headers.get("access-control-allow-origin") == origin
    assert response.status_code == (204 if granted else 403), response.status_code
    assert response.content == b""
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


def test_preflight_grants_the_methods_and_the_headers_ollama_grants(api: str) -> None:
    response = preflight(api, "http://localhost:5173", "/v1/chat/completions")
    assert response.status_code == 204
    assert "POST" in response.headers["access-control-allow-methods"]
    granted = {
        h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
    }
    assert granted >= GRANTED_HEADERS
    assert response.headers["access-control-max-age"] == str(12 * 3600)


def test_a_preflight_asking_for_other_headers_gets_the_lists_and_the_browser_decides(
    api: str,
) -> None:
    headers = {
        "Origin": "http://localhost:5173",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-custom",
    }
    response = httpx.options(api + "/api/chat", headers=headers)
    assert response.status_code == 204
    assert "x-custom" not in response.headers["access-control-allow-headers"].lower()


def test_simple_requests_carry_the_header_only_for_allowed_origins(api: str) -> None:
    ok = httpx.get(api + "/api/version", headers={"Origin": "http://localhost:3000"})
    assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    refused = httpx.get(api + "/api/version", headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and refused.content == b""
    assert "access-control-allow-origin" not in refused.headers
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


def test_a_request_from_its_own_origin_is_no_cors_request(api: str) -> None:
    """gin-contrib/cors: an Origin equal to http(s)://<Host> passes, with no CORS header
    (a page served by the gateway's own host and port)."""
    port = httpx.URL(api).port
    host = f"gateway.local:{port}"
    own = httpx.get(api + "/api/version", headers={"Host": host, "Origin": f"http://{host}"})
    assert own.status_code == 200 and not _cors_headers(own)
    plain = httpx.get(api + "/api/version")  # no Origin: no CORS header, not even Vary
    assert plain.status_code == 200 and not _cors_headers(plain)
    other = httpx.get(
        api + "/api/version", headers={"Host": host, "Origin": f"http://other.local:{port}"}
    )
    assert other.status_code == 403


def test_a_refused_origin_runs_nothing(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    host = fleet.standin("llama3")
    fleet.start_api()
    fleet.worker(host)
    fleet.wait_for_models("llama3:latest")
    body = {"model": "llama3", "prompt": "hi", "stream": False}
    for path in ("/api/generate", "/v1/completions"):
        refused = httpx.post(
            fleet.url + path, json=body, headers={"Origin": "https://evil.example"}, timeout=10
        )
        assert refused.status_code == 403 and refused.content == b""
    ok = httpx.post(
        fleet.url + "/api/generate", json=body, headers={"Origin": "http://localhost"}, timeout=10
    )
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost"
    assert [path for method, path, _ in host.requests if method == "POST"] == ["/api/generate"]


def _cors_headers(response: httpx.Response) -> list[str]:
    """The CORS headers of ``response`` (``Vary`` counts: gin-contrib/cors sends none of them
    to a request that is no CORS request)."""
    return [
        name for name in response.headers if name.startswith("access-control-") or name == "vary"
    ]
