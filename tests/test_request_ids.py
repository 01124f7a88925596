"""X-Request-Id from the client to the worker's log lines, and LOG_FORMAT=json, on a real
fleet whose API and worker write JSON lines to a log file of their own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oshepherd.logs import MAX_REQUEST_ID, valid_request_id
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet, fresh_database
from tests.conftest import WORKER_SETTINGS

HEX32 = r"[0-9a-f]{32}"


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        (b"abc-123", "abc-123"),
        (b"x" * MAX_REQUEST_ID, "x" * MAX_REQUEST_ID),
        (b"x" * (MAX_REQUEST_ID + 1), None),
        (b"", None),
        (b" padded", None),
        (b"tab\there", None),
        ("caf\u00e9".encode(), None),
    ],
)
def test_a_clients_request_id_is_kept_only_when_printable_and_short(
    raw: bytes, kept: str | None
) -> None:
    assert valid_request_id(raw) == kept


@pytest.fixture(scope="module")
def logged(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Fleet, Path]]:
    """One host (llama3), its worker at DEBUG, the API; both log JSON into ``path``."""
    path = tmp_path_factory.mktemp("json-logs") / "fleet.log"
    with path.open("ab") as log:
        fleet = Fleet(
            fresh_database(redis_server),
            log,
            api={"log_format": "json"},
            worker={**WORKER_SETTINGS, "log_format": "json", "loglevel": "DEBUG"},
        )
        try:
            host = fleet.standin("llama3")
            fleet.start_api()
            fleet.worker(host, worker_id="solo")
            fleet.wait_for_models("llama3:latest")
            yield fleet, path
        finally:
            fleet.stop()


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, parsed: each must be one JSON object."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lines_about(path: Path, request_id: str, logger: str) -> list[dict[str, Any]]:
    """The log's lines from ``logger`` about the request ``request_id``."""
    return [r for r in records(path) if r.get("request_id") == request_id and r["logger"] == logger]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_request_id_reaches_the_workers_log_lines(logged: tuple[Fleet, Path]) -> None:
    fleet, path = logged
    body = {"model": "llama3", "prompt": "hi", "stream": False}
    headers = {"X-Request-Id": "trace-me-42"}
    answer = httpx.post(fleet.url + "/api/generate", json=body, headers=headers, timeout=10)
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-me-42"

    def worker_lines() -> list[dict[str, Any]]:
        return lines_about(path, "trace-me-42", "oshepherd.worker.jobs")

    wait_until(lambda: bool(worker_lines()), 5, "the worker's line with the request id")
    line = worker_lines()[0]
    assert set(line) >= {"time", "level", "logger", "message", "request_id"}
    assert line["level"] == "DEBUG" and "POST /api/generate" in line["message"]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_apis_lines_about_a_request_name_it(logged: tuple[Fleet, Path]) -> None:
    fleet, path = logged
    headers = {"X-Request-Id": "pull-7"}
    body = {"model": "fresh:1b", "stream": False}
    answer = httpx.post(fleet.url + "/api/pull", json=body, headers=headers, timeout=10)
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "pull-7"

    def api_lines() -> list[dict[str, Any]]:
        return lines_about(path, "pull-7", "oshepherd.api.fanout")

    wait_until(lambda: bool(api_lines()), 5, "the API's line with the request id")
    assert api_lines()[0]["message"] == "pull: on solo"
    assert all(isinstance(r, dict) for r in records(path))  # every line is JSON
    # the documented fields (and a traceback's exc_info), without the text format's
    # " [id]" or uvicorn's color_message with its terminal escapes
    assert not [r for r in records(path) if {"request", "color_message"} & set(r)]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_every_answer_carries_an_id_errors_too(logged: tuple[Fleet, Path]) -> None:
    fleet, _ = logged
    ids = []
    for method, path, body in [
        ("GET", "/api/version", None),
        ("POST", "/api/generate", {"model": "nope"}),  # 404 from the gateway
        ("POST", "/api/chat", {"model": 3}),  # 400
        ("GET", "/nowhere", None),  # 404 from the router
    ]:
        answer = httpx.request(method, fleet.url + path, json=body, timeout=5)
        assert answer.status_code in (200, 400, 404)
        ids.append(answer.headers["x-request-id"])
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == len(ids)
    refused = httpx.get(fleet.url + "/api/tags", headers={"X-Request-Id": "x" * 200})
    assert len(refused.headers["x-request-id"]) == 32  # too long: replaced
