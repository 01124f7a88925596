"""The gateway through the official ollama-js client: each test runs one named check of
tests/js/conformance.mjs in Node.js against a fleet of two hosts, one worker each."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet
from tests.conftest import tag_names, two_hosts

JS = Path(__file__).parent / "js"
INSTALL = "npm ci --prefix tests/js"
NODE = shutil.which("node")
if NODE is None:
    pytest.skip(
        "node is not installed: the ollama-js checks need Node.js 20+", allow_module_level=True
    )

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

TOKENS = "tok0 tok1 tok2 tok3 tok4 "


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    # A missing client is a broken checkout, not an optional extra: fail, do not skip.
    if not (JS / "node_modules" / "ollama").is_dir():
        pytest.fail(f"tests/js/node_modules is missing: run `{INSTALL}`")
    models = ("llama3", "shared:7b"), ("qwen2:7b", "shared:7b")
    with two_hosts(redis_server, stack_log, *models, version="0.11.4") as fleet:
        yield fleet


@pytest.fixture(autouse=True)
def fresh_counters(fleet: Fleet) -> None:
    for host in fleet.standins:
        host.reset_counters()


def js(fleet: Fleet, check: str) -> dict[str, Any]:
    """Run one check of conformance.mjs against the fleet and return its result line."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(JS / "conformance.mjs"), fleet.url, check],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert result.pop("check") == check
    return result


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        ("list", {"models": ["llama3:latest", "qwen2:7b", "shared:7b"]}),
        ("chat", {"content": TOKENS, "model": "qwen2:7b", "done_reason": "stop", "eval_count": 5}),
        ("generate", {"response": TOKENS, "done": True, "model": "llama3", "context": [1, 2, 3]}),
        ("embed", {"count": 2, "dims": [8, 8], "norms": [1, 1]}),
        ("show", {"family": "llama", "capabilities": ["completion", "tools", "thinking"]}),
        # The fleet's lowest Ollama version.
        ("version", {"version": "0.11.4"}),
        (
            "missing-model",
            {"name": "ResponseError", "status_code": 404, "error": "model 'nope:1b' not found"},
        ),
    ],
)
def test_check(fleet: Fleet, check: str, expected: dict[str, Any]) -> None:
    assert js(fleet, check) == expected


def test_pull_progress_ends_with_success_and_the_model_is_listed(fleet: Fleet) -> None:
    try:
        result = js(fleet, "pull")
        # The last layer line sums both hosts' progress.
        layer = {"total": 2000, "completed": 2000}
        assert result == {"last": "success", "layer": layer, "listed": True}
        for host in fleet.standins:
            pulls = [body for _, path, body in host.requests if path == "/api/pull"]
            assert pulls == [{"name": "jspull:1b", "stream": True}]
    finally:
        httpx.request("DELETE", fleet.url + "/api/delete", json={"model": "jspull:1b"})
    assert "jspull:1b" not in tag_names(fleet.url)


def test_create_copy_push_delete(fleet: Fleet) -> None:
    result = js(fleet, "manage")
    assert result == {
        "created": "success",
        "pushed": "success",
        "listed": ["jsmade:latest", "jscopy:latest"],
        "left": [],
    }
    for host in fleet.standins:
        assert [body for _, path, body in host.requests if path == "/api/delete"] == [
            {"name": "jsmade"},
            {"name": "jscopy"},
        ]


@pytest.mark.parametrize("check", ["abort", "abort-stream"])
def test_abort_stops_the_generation(fleet: Fleet, check: str) -> None:
    a = fleet.standins[0]  # the only holder of llama3
    a.tokens, a.token_delay = 400, 0.02  # eight seconds of tokens unless stopped
    try:
        assert js(fleet, check) == {"parts": 2, "error": "AbortError"}
        a.wait_for(lambda h: h.disconnects >= 1)
        a.wait_for(lambda h: h.active == 0)  # the generation ended: no more tokens
    finally:
        a.tokens, a.token_delay = 5, 0.0
    assert a.completed == 0 and a.tokens_sent < 400
