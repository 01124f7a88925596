"""API keys on a real fleet: the official clients with keys, errors in each surface's shape,
listing filtered by a key's models, revocation on two replicas, the CLI's last line, the
HTTP admin routes, and client-address allowlists behind (un)trusted proxies."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import anthropic
import httpx
import ollama
import openai
import pytest
import redis

from oshepherd.keys import KeyStore
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet, fresh_database
from tests.conftest import one_host

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

HELLO: list[Any] = [{"role": "user", "content": "hi"}]  # every SDK's message shape


class Keys:
    """The fleet's keys, made with the store the CLI and the admin routes use."""

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url

    def create(self, **values: Any) -> str:
        with redis.Redis.from_url(self.url) as client:
            secret, _ = KeyStore(client).create({"name": "test", **values})
        return secret


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with one_host(redis_server, stack_log, "llama3", "qwen2:7b") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def keys(fleet: Fleet) -> Keys:
    return Keys(fleet.stack.redis_url)


@pytest.fixture(scope="module")
def admin(keys: Keys, fleet: Fleet) -> str:
    """An admin key; keys are on from here, seen by the API before a test uses them."""
    secret = keys.create(scope="admin")
    wait_until(lambda: _tags(fleet.url, "").status_code == 401, 5, "keys on")
    return secret


@pytest.fixture(scope="module")
def user(keys: Keys, admin: str) -> str:
    """A user key for llama3 only."""
    return keys.create(models="llama3")


def _tags(url: str, key: str, **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/api/tags", headers={**auth, **headers}, timeout=5)


def _wait_known(url: str, key: str) -> None:
    wait_until(lambda: _tags(url, key).status_code == 200, 5, "key known to the API")


def test_no_first_key_over_http(fleet: Fleet) -> None:
    """Runs first, while keys are off: an open API must not let anyone make the first key."""
    made = httpx.post(fleet.url + "/oshepherd/v1/keys", json={"name": "intruder", "scope": "admin"})
    assert made.status_code == 403 and made.json()["code"] == "keys_off", made.text
    assert _tags(fleet.url, "").status_code == 200  # and keys are still off


def test_ollama_python_with_headers_and_with_ollama_api_key(
    fleet: Fleet, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wait_known(fleet.url, user)
    client = ollama.Client(host=fleet.url, headers={"Authorization": f"Bearer {user}"})
    assert client.chat(model="llama3", messages=HELLO).message.content
    monkeypatch.setenv("OLLAMA_API_KEY", user)
    from_env = ollama.Client(host=fleet.url)
    assert [m.model for m in from_env.list().models] == ["llama3:latest"]
    with pytest.raises(ollama.ResponseError) as refused:
        from_env.chat(model="qwen2:7b", messages=HELLO)
    assert refused.value.status_code == 403


def test_openai_and_anthropic_sdks_with_api_key(fleet: Fleet, user: str) -> None:
    _wait_known(fleet.url, user)
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key=user, max_retries=0) as client:
        reply = client.chat.completions.create(model="llama3", messages=HELLO)
        assert reply.choices[0].message.content
        assert [m.id for m in client.models.list()] == ["llama3:latest"]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.models.retrieve("qwen2:7b")
        assert refused.value.code == "model_not_allowed"
    with anthropic.Anthropic(base_url=fleet.url, api_key=user, max_retries=0) as claude:
        message = claude.messages.create(model="llama3", max_tokens=10, messages=HELLO)
        assert message.content


def test_wrong_keys_are_401s_in_each_surfaces_shape(fleet: Fleet, admin: str) -> None:
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="osk-" + "x" * 43, max_retries=0)
    with client, pytest.raises(openai.AuthenticationError) as unknown:
        client.chat.completions.create(model="llama3", messages=HELLO)
    assert unknown.value.code == "invalid_api_key"
    claude = anthropic.Anthropic(base_url=fleet.url, api_key="nope", max_retries=0)
    with claude, pytest.raises(anthropic.AuthenticationError) as malformed:
        claude.messages.create(model="llama3", max_tokens=10, messages=HELLO)
    assert malformed.value.body["error"]["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(ollama.ResponseError) as missing:
        ollama.Client(host=fleet.url).chat(model="llama3", messages=HELLO)
    assert missing.value.status_code == 401
    answer = httpx.post(fleet.url + "/api/chat", headers={"api-key": admin}, json={})
    assert answer.status_code == 401
    assert answer.json()["code"] == "missing_api_key"
    assert "'api-key'" in answer.json()["error"] and "x-api-key" in answer.json()["error"]
    basic = httpx.get(fleet.url + "/api/tags", auth=("user", "pass"))
    assert basic.status_code == 401 and "Basic" in basic.json()["error"]


def test_open_routes_scope_and_priority(fleet: Fleet, user: str, admin: str) -> None:
    assert httpx.get(fleet.url + "/").status_code == 200
    assert httpx.get(fleet.url + "/api/version").status_code == 200
    _wait_known(fleet.url, user)
    pull = httpx.post(fleet.url + "/api/pull", headers={"x-api-key": user}, json={"model": "x"})
    assert pull.status_code == 403 and pull.json()["code"] == "insufficient_scope"
    bad = httpx.post(
        fleet.url + "/v1/messages",
        headers={"x-api-key": user, "X-Oshepherd-Priority": "urgent"},
        json={"model": "llama3", "max_tokens": 5, "messages": HELLO},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_priority"
    ps = httpx.get(fleet.url + "/api/ps", headers={"x-api-key": admin})
    assert ps.status_code == 200


def test_an_admin_keys_models_bound_its_model_management(fleet: Fleet, keys: Keys) -> None:
    scoped = keys.create(scope="admin", models="llama3")
    _wait_known(fleet.url, scoped)
    auth = {"x-api-key": scoped}
    for method, path, body in [
        ("POST", "/api/pull", {"model": "qwen2:7b"}),
        ("DELETE", "/api/delete", {"model": "qwen2:7b"}),
        ("POST", "/api/copy", {"source": "llama3", "destination": "qwen2:7b"}),
    ]:
        refused = httpx.request(method, fleet.url + path, headers=auth, json=body, timeout=5)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["code"] == "model_not_allowed"


def test_admin_routes_and_revocation_on_two_replicas(
    fleet: Fleet, admin: str, stack_log: IO[bytes]
) -> None:
    second = fleet.stack.start_api()
    made = httpx.post(
        fleet.url + "/oshepherd/v1/keys",
        headers={"x-api-key": admin},
        json={"name": "temp", "models": ["qwen2*"]},
    )
    assert made.status_code == 201, made.text
    secret, key_id = made.json()["key"], made.json()["id"]
    _wait_known(second.url, secret)
    assert [m["name"] for m in _tags(second.url, secret).json()["models"]] == ["qwen2:7b"]
    listed = httpx.get(fleet.url + "/oshepherd/v1/keys", headers={"x-api-key": admin}).json()
    assert key_id in [k["id"] for k in listed["keys"]]
    assert all("key" not in k for k in listed["keys"])
    refused = httpx.get(fleet.url + "/oshepherd/v1/keys", headers={"x-api-key": secret})
    assert refused.status_code == 403
    bad = httpx.patch(
        fleet.url + f"/oshepherd/v1/keys/{key_id}", headers={"x-api-key": admin}, json={"rpm": -1}
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_key_field"
    revoked = httpx.delete(fleet.url + f"/oshepherd/v1/keys/{key_id}", headers={"x-api-key": admin})
    assert revoked.status_code == 200
    start = time.monotonic()
    wait_until(lambda: _tags(second.url, secret).status_code == 401, 1.0, "revoked on replica 2")
    assert _tags(fleet.url, secret).status_code == 401
    assert time.monotonic() - start < 1.0


def test_a_request_queued_when_its_key_is_revoked_is_a_401(
    fleet: Fleet, keys: Keys, admin: str
) -> None:
    """The worker's 4 slots busy, a fifth request waits in its key's queue; revoked, that
    key's running requests finish, the waiting one is a 401 within a few seconds (it was a
    503 'no healthy worker has model' with Retry-After, 10 s later)."""
    secret = keys.create(name="revoked-while-queued")
    _wait_known(fleet.url, secret)
    host = fleet.standins[0]
    host.latency = 2.0
    answers: list[httpx.Response] = []

    def generate() -> None:
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        headers = {"x-api-key": secret}
        url = fleet.url + "/api/generate"
        answers.append(httpx.post(url, json=body, headers=headers, timeout=30))

    threads = [threading.Thread(target=generate) for _ in range(5)]
    try:
        for thread in threads:
            thread.start()
        host.wait_for(lambda h: h.active == 4, timeout=10)
        with redis.Redis.from_url(keys.url) as client:
            KeyStore(client).revoke("revoked-while-queued")
        start = time.monotonic()
        refused = lambda: [a for a in answers if a.status_code != 200]  # noqa: E731
        wait_until(lambda: bool(refused()), 5, "the queued request answered")
        assert time.monotonic() - start < 4.0
        assert refused()[0].status_code == 401, refused()[0].text
        assert refused()[0].json()["code"] == "invalid_api_key"
        for thread in threads:
            thread.join(timeout=10)
        assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 401]
    finally:
        host.latency = 0.0


def test_cli_prints_the_key_alone_on_its_last_line(fleet: Fleet, tmp_path: Path) -> None:
    env_file = tmp_path / "api.env"
    env_file.write_text(f"CELERY_BROKER_URL={fleet.stack.redis_url}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "REDIS_URL")}
    command = [sys.executable, "-m", "oshepherd", "keys", "create", "--env-file", str(env_file)]
    made = subprocess.run(
        [*command, "--name", "cli", "--rpm", "100"], env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.splitlines()[-1]
    _wait_known(fleet.url, secret)
    wrong = subprocess.run(
        [*command, "--name", "cli", "--rpm", "ten"], env=env, capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "'--rpm'" in wrong.stderr


def test_a_spoofed_forwarded_for_is_ignored_and_a_trusted_proxys_believed(
    fleet: Fleet, keys: Keys, admin: str
) -> None:
    office = keys.create(allow_ips="10.0.0.0/8")
    _wait_known_from(fleet.url, office, "10.1.2.3", expect=403)
    spoofed = _tags(fleet.url, office, **{"X-Forwarded-For": "10.1.2.3"})
    assert spoofed.status_code == 403 and spoofed.json()["code"] == "ip_not_allowed"
    proxied = fleet.stack.start_api(trusted_proxies="127.0.0.1", allow_ips="10.0.0.0/8")
    _wait_known_from(proxied.url, office, "10.1.2.3", expect=200)
    assert _tags(proxied.url, office, **{"X-Forwarded-For": "192.168.1.1"}).status_code == 403
    direct = _tags(proxied.url, admin)
    assert direct.status_code == 403 and direct.json()["code"] == "ip_not_allowed"
    assert httpx.get(proxied.url + "/").status_code == 200


def _wait_known_from(url: str, key: str, address: str, *, expect: int) -> None:
    what = f"{expect} for a client at {address}"
    xff = {"X-Forwarded-For": address}
    wait_until(lambda: _tags(url, key, **xff).status_code == expect, 5, what)


def test_an_open_api_beyond_loopback_warns(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log, Fleet(fresh_database(redis_server), log) as fleet:
        fleet.start_api(host="0.0.0.0")
        wait_until(lambda: b"no API key exists" in log_path.read_bytes(), 5, "the warning")
    text = log_path.read_text()
    assert "anyone who reaches it can run, pull and delete models" in text
    assert "oshepherd keys create" in text
