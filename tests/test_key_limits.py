"""Limits per key and usage, on real processes: redis-server, two API processes, a worker,
the stand-in. Each limit answers 429 with Retry-After and its code in the shape of /api,
/v1 and /v1/messages; the concurrency limit holds across API processes; the tokens of the
stand-in's final chunk land in usage and exhaust a budget; a killed API's lease expires;
``oshepherd usage`` prints what was counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import IO, Any

import anthropic
import httpx
import openai
import pytest
import redis

from oshepherd.keys import KeyStore
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import Component, wait_until
from oshepherd.testing.fleet import Fleet
from tests.conftest import one_host

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

LEASE_TTL = 1.0  # seconds: a killed API's lease is gone within this
PROMPT = "why is the sky blue"  # five prompt tokens for the stand-in; it answers five
MESSAGES = [{"role": "user", "content": PROMPT}]
SURFACES: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": "llama3", "prompt": PROMPT, "stream": False},
    "/v1/chat/completions": {"model": "llama3", "messages": MESSAGES},
    "/v1/messages": {"model": "llama3", "messages": MESSAGES, "max_tokens": 9},
}


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with one_host(redis_server, stack_log, "llama3", lease_ttl=LEASE_TTL) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def store(fleet: Fleet) -> Iterator[KeyStore]:
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        yield KeyStore(client)


@pytest.fixture(scope="module")
def second_api(fleet: Fleet) -> Component:
    """Another API process on the same Redis."""
    return fleet.stack.start_api(lease_ttl=LEASE_TTL)


def new_key(fleet: Fleet, store: KeyStore, **limits: Any) -> tuple[str, str]:
    """A key with ``limits`` (its secret and id), once the API knows it."""
    secret, key = store.create({"name": f"k{len(store.list_keys())}", **limits})
    tags = fleet.url + "/api/tags"
    wait_until(
        lambda: (
            httpx.get(tags).status_code == 401
            and httpx.get(tags, headers=auth(secret)).status_code == 200
        ),
        5,
        "the API to know the new key",
    )
    return secret, key.id


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def post(url: str, path: str, secret: str) -> httpx.Response:
    return httpx.post(url + path, json=SURFACES[path], headers=auth(secret), timeout=10)


def assert_refused(response: httpx.Response, path: str, code: str) -> int:
    """``response`` is a 429 with ``code`` in ``path``'s shape; its Retry-After (s)."""
    assert response.status_code == 429, response.text
    body = response.json()
    if path.startswith("/api"):
        assert body["code"] == code and isinstance(body["error"], str)
    elif path == "/v1/messages":
        assert body["type"] == "error"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == code
    else:
        assert body["error"]["code"] == code and body["error"]["type"] == "rate_limit_error"
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


@pytest.mark.parametrize("path", list(SURFACES))
def test_rate_limit(fleet: Fleet, store: KeyStore, path: str) -> None:
    secret, _ = new_key(fleet, store, rpm=2)
    assert post(fleet.url, path, secret).status_code == 200
    assert post(fleet.url, path, secret).status_code == 200
    assert assert_refused(post(fleet.url, path, secret), path, "rate_limited") <= 60


@pytest.mark.parametrize("path", list(SURFACES))
def test_concurrency_limit_holds_across_api_processes(
    fleet: Fleet, store: KeyStore, second_api: Component, path: str
) -> None:
    secret, _ = new_key(fleet, store, max_concurrent=1)
    host = fleet.standins[0]
    host.token_delay = 0.2  # a stream of five tokens holds its lease about a second
    try:
        body = {"model": "llama3", "prompt": PROMPT}
        with httpx.stream(
            "POST", fleet.url + "/api/generate", json=body, headers=auth(secret)
        ) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # running
            assert_refused(post(second_api.url, path, secret), path, "concurrency_limited")
            assert_refused(post(fleet.url, path, secret), path, "concurrency_limited")
            list(lines)
    finally:
        host.token_delay = 0.0
    # The lease is released after the response, in the background.
    wait_until(lambda: post(second_api.url, path, secret).status_code == 200, 5, "a release")


def test_tokens_land_in_usage_and_exhaust_the_budget(
    fleet: Fleet, store: KeyStore, tmp_path: Any
) -> None:
    secret, key_id = new_key(fleet, store, tokens_per_day=12)
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=secret)
    stream = client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)  # the probe's usage chunk is not relayed
    admin, _ = new_key(fleet, store, scope="admin")

    def usage() -> list[dict[str, Any]]:
        got = httpx.get(fleet.url + "/oshepherd/v1/usage", params={"key": key_id},
                        headers=auth(admin))  # fmt: skip
        assert got.status_code == 200, got.text
        rows: list[dict[str, Any]] = got.json()["usage"]
        return rows

    wait_until(lambda: bool(usage()), 5, "the usage of the first request")
    (row,) = usage()
    assert (row["model"], row["requests"]) == ("llama3:latest", 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5, 5)
    # 10 of 12 used: one more request is admitted, and takes the key past its budget.
    assert post(fleet.url, "/api/generate", secret).status_code == 200
    wait_until(lambda: usage()[0]["requests"] == 2, 5, "the usage of the second request")
    for path in SURFACES:
        retry_after = assert_refused(post(fleet.url, path, secret), path, "token_budget_exhausted")
        assert retry_after <= 86400
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": PROMPT}]
        )
    assert refused.value.code == "token_budget_exhausted"
    # The Anthropic SDK sleeps for any Retry-After (here hours) before its retries, unless
    # told not to retry (x-should-retry: false); with its default retries it must fail now.
    claude = anthropic.Anthropic(base_url=fleet.url, api_key=secret, timeout=10)
    with claude, pytest.raises(anthropic.RateLimitError) as exhausted:
        claude.messages.create(model="llama3", max_tokens=9, messages=MESSAGES)  # type: ignore[arg-type]
    assert exhausted.value.body["error"]["code"] == "token_budget_exhausted"  # type: ignore[index]

    env_file = tmp_path / "api.env"
    env_file.write_text(f"CELERY_BROKER_URL={fleet.stack.redis_url}\n")
    cli = [sys.executable, "-m", "oshepherd", "usage", "--env-file", str(env_file)]
    out = subprocess.run([*cli, "--key", key_id, "--json"], capture_output=True, check=True)
    (printed,) = json.loads(out.stdout)
    assert printed["requests"] == 2 and printed["prompt_tokens"] == 10
    assert printed["completion_tokens"] == 10
    table = subprocess.run([*cli, "--days", "2"], capture_output=True, check=True, text=True)
    assert key_id in table.stdout and "llama3:latest" in table.stdout
    assert "completion tokens" in table.stdout


def test_a_killed_api_leaves_a_lease_that_expires(fleet: Fleet, store: KeyStore) -> None:
    secret, _ = new_key(fleet, store, max_concurrent=1)
    doomed = fleet.stack.start_api(lease_ttl=LEASE_TTL)
    host = fleet.standins[0]
    host.token_delay = 0.5
    try:
        body = {"model": "llama3", "prompt": PROMPT}
        with httpx.stream(
            "POST", doomed.url + "/api/generate", json=body, headers=auth(secret)
        ) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            assert_refused(post(fleet.url, "/api/generate", secret), "/api/generate",
                           "concurrency_limited")  # fmt: skip
            os.kill(doomed.process.pid, signal.SIGKILL)
            doomed.process.wait(5)
    except httpx.HTTPError:
        pass  # the stream broke with its API
    finally:
        host.token_delay = 0.0
    # No renewal: the lease is gone within LEASE_TTL (the stand-in still streams to nobody).
    wait_until(
        lambda: post(fleet.url, "/api/generate", secret).status_code == 200,
        4 * LEASE_TTL,
        "the killed API's lease to expire",
    )
