"""The rules of a worker's Redis user (``oshepherd.acl``), without a Redis: what they never
grant, how a per-worker user names its own keys, and how the lines are written; a worker's
TLS options for a ``rediss://`` broker."""

from __future__ import annotations

from pathlib import Path
from ssl import CERT_REQUIRED

import pytest
from click.testing import CliRunner

from oshepherd.acl import WORKER_COMMANDS, aclfile_line, quote, setuser_command, worker_rules
from oshepherd.cli import main
from oshepherd.worker.celery_app import broker_tls

# Commands that put a message on a list, or read or list what a worker must not see.
NEVER = {
    "lpush", "rpush", "lpushx", "rpushx", "linsert", "lset", "lmove", "blmove", "rpoplpush",
    "brpoplpush", "restore", "copy", "rename", "renamenx", "sort", "migrate", "move",
    "psubscribe", "pubsub", "keys", "scan", "monitor", "config", "flushall", "flushdb",
    "hgetall", "hget", "eval", "debug", "acl", "client", "script",
}  # fmt: skip


def test_no_rule_grants_a_push_a_listing_or_an_admin_command() -> None:
    assert not NEVER & set(WORKER_COMMANDS)
    rules = worker_rules()
    assert rules[:2] == ["resetchannels", "-@all"]
    assert not [r for r in rules if r.startswith("+@") or r in ("~*", "&*", "allkeys")]
    assert not [r for r in rules if r.startswith("~oshepherd:") and "keys" in r]
    assert not [r for r in rules if "usage" in r or "limits" in r]


def test_a_user_bound_to_one_worker_names_only_its_keys_literally() -> None:
    rules = worker_rules("a*b")
    assert "~oshepherd:worker:a\\*b" in rules and "~oshepherd:worker:*" not in rules
    assert "~oshepherd.worker.a\\*b\x06\x163" in rules and "~oshepherd.worker.*" not in rules
    with pytest.raises(ValueError):
        worker_rules("a b")
    with pytest.raises(ValueError):
        setuser_command("a b", "pw")


def test_lines_for_redis_cli_and_for_an_acl_file() -> None:
    assert quote("~oshepherd.model.*") == "~oshepherd.model.*"
    assert quote('>p "q"\x06é') == '">p \\"q\\"\\x06\\xc3\\xa9"'
    line = aclfile_line("w", "pw", "beta")
    assert line.startswith("user w reset on >pw resetchannels -@all ")
    assert "~oshepherd.worker.beta\x06\x163" in line.split(" ")  # raw: 6.2 reads no quotes
    with pytest.raises(ValueError):
        aclfile_line("w", "p w")


def test_the_cli_prints_the_command_and_the_workers_url() -> None:
    result = CliRunner().invoke(main, ["worker-acl", "--user", "w", "--password", "p@ss"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("ACL SETUSER w reset on >p@ss ")
    assert "redis://w:p%40ss@HOST:6379/0" in result.stderr
    result = CliRunner().invoke(main, ["worker-acl", "--user", "w", "--worker-id", "a b"])
    assert result.exit_code == 2 and "without spaces" in result.output


def test_a_rediss_broker_is_tls_with_verification_unless_the_url_says_otherwise() -> None:
    assert broker_tls("rediss://w:pw@redis.example:6380/0") == {"ssl_cert_reqs": CERT_REQUIRED}
    assert broker_tls("rediss://redis.example:6380/0?ssl_cert_reqs=optional") is None
    assert broker_tls("redis://redis.example:6379/0") is None


def test_the_rules_in_the_docs_are_the_codes() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "redis-acl.md").read_text()
    start = doc.index("resetchannels -@all")
    assert doc[start : doc.index("\n```", start)].split() == worker_rules()
