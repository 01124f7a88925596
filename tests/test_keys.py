"""API keys without processes: the record and its checks (oshepherd.keys), and the
Authenticate middleware (oshepherd.api.auth) in front of a plain ASGI app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
import pytest

from oshepherd.api.auth import Authenticate, Caller, KeyTable, caller, check_model
from oshepherd.api.errors import Forbidden, error_body
from oshepherd.keys import (
    LIMIT_MAX,
    ApiKey,
    InvalidKey,
    checked,
    digest,
    looks_like_secret,
    parse_table,
)

SECRET = "osk-" + "a" * 43
ADMIN_SECRET = "osk-" + "b" * 43


def test_checked_normalizes_and_refuses_bad_fields() -> None:
    values = checked({"name": " alice ", "models": "Llama3,qwen*", "allow_ips": "10.1.2.3/8"})
    assert values == {"name": "alice", "models": ("llama3:latest", "qwen*"),
                      "allow_ips": ("10.0.0.0/8",)}  # fmt: skip
    assert checked({"rpm": None, "models": []}) == {"rpm": None, "models": ()}
    bad_fields: list[dict[str, Any]] = [
        {"scope": "root"},
        {"priority": "urgent"},
        {"rpm": -1},
        {"rpm": 0},
        {"max_concurrent": "3"},
        {"tokens_per_day": True},
        {"tokens_per_day": 1.5},
        {"allow_ips": "10.0.0.300/8"},
        {"allow_ips": [3]},
        {"models": "a[b"},
        {"models": ["two words"]},
        {"models": 3},
        {"name": ""},
        {"colour": "red"},
    ]
    for bad in bad_fields:
        with pytest.raises(InvalidKey):
            checked(bad)


def test_a_limit_too_large_to_store_is_refused() -> None:
    # The CLI's `--rpm 99999999999999999999` was a TypeError from orjson (past 64 bits).
    for name in ("max_concurrent", "rpm", "tokens_per_day"):
        with pytest.raises(InvalidKey, match=f"'{name}'"):
            checked({name: 10**20})
        key = ApiKey("k1", "n", **checked({name: LIMIT_MAX}))
        assert ApiKey.from_json(key.to_json()) == key


def test_the_message_names_the_field() -> None:
    with pytest.raises(InvalidKey, match="'rpm'"):
        checked({"rpm": "ten"})


def test_allows_model_and_address() -> None:
    key = ApiKey("k1", "n", models=("llama3*", "qwen:latest"), allow_ips=("10.0.0.0/8",))
    assert key.allows_model("llama3:8b") and key.allows_model("qwen:latest")
    assert not key.allows_model("qwen:7b")
    assert key.allows_address("10.9.8.7") and key.allows_address("::ffff:10.0.0.1")
    assert not key.allows_address("127.0.0.1") and not key.allows_address("not-an-ip")
    assert ApiKey("k2", "n").allows_model("anything:1b")


def test_records_round_trip_and_bad_ones_are_left_out() -> None:
    key = ApiKey("k1", "n", models=("a*",), rpm=3, allow_ips=("::1/128",), created=1.5)
    assert ApiKey.from_json(key.to_json()) == key
    table = parse_table({b"h1": key.to_json(), b"h2": b"{not json", b"h3": b'{"id": 1}'})
    assert table == {"h1": key}


def test_secrets_have_one_form() -> None:
    assert looks_like_secret(SECRET)
    assert not looks_like_secret("osk-short") and not looks_like_secret("sk-" + "a" * 44)
    assert digest(SECRET) != digest(ADMIN_SECRET) and len(digest(SECRET)) == 64


def test_error_bodies_carry_the_code() -> None:
    assert orjson.loads(error_body("/api/chat", 401, "no", "missing_api_key")) == {
        "error": "no",
        "code": "missing_api_key",
    }
    openai = orjson.loads(error_body("/v1/models", 401, "no", "invalid_api_key"))["error"]
    assert openai["code"] == "invalid_api_key" and openai["type"] == "invalid_request_error"
    anthropic = orjson.loads(error_body("/v1/messages", 403, "no", "model_not_allowed"))
    assert anthropic["error"] == {
        "type": "permission_error",
        "message": "no",
        "code": "model_not_allowed",
    }
    assert orjson.loads(error_body("/api/chat", 400, "bad")) == {"error": "bad"}


# The middleware in front of an app that records the caller.


def _table(*keys: tuple[str, ApiKey], loaded: bool = True) -> KeyTable:
    table = KeyTable()
    table.keys = {digest(secret): key for secret, key in keys}
    table.loaded = loaded
    return table


USER = ApiKey("user1", "u", models=("llama3*",), priority="normal")
ADMIN = ApiKey("admin1", "a", scope="admin", priority="high")
KEYS = _table((SECRET, USER), (ADMIN_SECRET, ADMIN))


def _call(
    table: KeyTable,
    path: str = "/api/chat",
    headers: dict[str, str] | None = None,
    *,
    method: str = "POST",
    allow_ips: tuple[str, ...] = (),
    client: str = "127.0.0.1",
    inside: Callable[[], None] = lambda: None,
) -> tuple[int, Any]:
    """The status and either the caller the app saw or the error body; the app runs
    ``inside`` too."""
    seen: list[Caller] = []
    sent: list[MutableMapping[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(caller())
        inside()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "client": (client, 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    asyncio.run(Authenticate(app, table=table, allow_ips=allow_ips)(scope, receive, send))
    if seen:
        return 200, seen[0]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], orjson.loads(body)


def test_keys_off_until_the_first_exists() -> None:
    status, who = _call(_table(), headers={"X-Oshepherd-Priority": "high"})
    assert status == 200 and who == Caller(None, "", "high", "127.0.0.1")
    assert _call(_table(), "/api/pull")[0] == 200


def test_fail_closed_until_the_table_is_read() -> None:
    status, body = _call(_table(loaded=False))
    assert status == 503 and body["code"] == "keys_unavailable"
    assert _call(_table(loaded=False), "/", method="GET")[0] == 200


def test_either_header_carries_the_key_and_priority_is_capped() -> None:
    status, who = _call(KEYS, headers={"Authorization": f"Bearer {SECRET}"})
    assert status == 200 and who.key == USER and who.tenant == "user1"
    assert who.priority == "normal"
    _, who = _call(KEYS, headers={"x-api-key": SECRET, "X-Oshepherd-Priority": "high"})
    assert who.key == USER and who.priority == "normal"
    _, who = _call(KEYS, headers={"x-api-key": SECRET, "X-Oshepherd-Priority": "low"})
    assert who.priority == "low"
    _, who = _call(KEYS, headers={"x-api-key": ADMIN_SECRET})
    assert who.priority == "high"


@pytest.mark.parametrize(
    ("headers", "code", "words"),
    [
        ({}, "missing_api_key", "needs an API key"),
        ({"Authorization": "Bearer osk-" + "z" * 43}, "invalid_api_key", "invalid API key"),
        ({"Authorization": "Bearer nope"}, "invalid_api_key", "malformed"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key", "Basic"),
        ({"Authorization": SECRET}, "invalid_api_key", "Bearer <key>"),
        ({"X-Auth-Token": SECRET}, "missing_api_key", "'x-auth-token'"),
    ],
)
def test_401s_say_what_is_wrong(headers: dict[str, str], code: str, words: str) -> None:
    status, body = _call(KEYS, headers=headers)
    assert status == 401 and body["code"] == code and words in body["error"]
    assert "x-api-key" in body["error"] or code == "invalid_api_key"


def test_open_routes_and_preflights_need_no_key() -> None:
    assert _call(KEYS, "/", method="GET")[0] == 200
    assert _call(KEYS, "/api/version", method="HEAD")[0] == 200
    assert _call(KEYS, "/api/version", method="POST")[0] == 401
    preflight = {"Access-Control-Request-Method": "POST"}
    assert _call(KEYS, "/api/chat", preflight, method="OPTIONS")[0] == 200
    assert _call(KEYS, "/api/chat", method="OPTIONS")[0] == 401


@pytest.mark.parametrize("path", ["/api/pull", "/api/delete/", "/api/blobs/sha256:00",
                                  "/oshepherd/v1/keys"])  # fmt: skip
def test_admin_routes_need_an_admin_key(path: str) -> None:
    status, body = _call(KEYS, path, {"x-api-key": SECRET})
    assert status == 403 and body["code"] == "insufficient_scope"
    assert _call(KEYS, path, {"x-api-key": ADMIN_SECRET})[0] == 200


def test_a_priority_that_is_no_level_is_a_400_in_the_routes_shape() -> None:
    status, body = _call(_table(), "/v1/chat/completions", {"X-Oshepherd-Priority": "urgent"})
    assert status == 400 and body["error"]["code"] == "invalid_priority"


def test_address_allowlists() -> None:
    key = ApiKey("k", "n", allow_ips=("10.0.0.0/8",))
    table = _table((SECRET, key))
    status, body = _call(table, "/v1/messages", {"x-api-key": SECRET})
    assert status == 403 and body["error"]["code"] == "ip_not_allowed"
    assert _call(table, headers={"x-api-key": SECRET}, client="10.1.1.1")[0] == 200
    status, body = _call(_table(), allow_ips=("192.168.0.0/16",))
    assert status == 403 and body["code"] == "ip_not_allowed"
    assert _call(_table(), allow_ips=("127.0.0.0/8",))[0] == 200
    assert _call(_table(), "/", method="GET", allow_ips=("192.168.0.0/16",))[0] == 200


def test_check_model_reads_the_callers_key() -> None:
    check_model("anything:latest")  # outside a request: no key
    with pytest.raises(Forbidden):
        _call(KEYS, headers={"x-api-key": SECRET}, inside=lambda: check_model("qwen:latest"))
    _call(KEYS, headers={"x-api-key": SECRET}, inside=lambda: check_model("llama3:8b"))
