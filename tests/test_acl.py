"""Workers as least-privilege Redis users (``oshepherd.acl``, docs/redis-acl.md): a real
redis-server holds the users, real workers connect as them and serve every kind of job
with no denial in ACL LOG, and what a worker must not do is refused."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import ollama
import pytest
import redis

from oshepherd.acl import setuser_command
from oshepherd.protocol import KEYS, model_queue, worker_key, worker_queue
from oshepherd.redis_server import EmbeddedRedis, redis_executable
from oshepherd.testing.fleet import Fleet
from tests.conftest import new_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SHARED, OWN = "oshepherd-test-workers", "oshepherd-test-beta"  # users
PASSWORD = "test-password"


def user_url(fleet: Fleet, user: str) -> str:
    """The fleet's Redis URL (its database) as ``user``."""
    return fleet.stack.redis_url.replace("redis://", f"redis://{user}:{PASSWORD}@", 1)


def denials(admin: redis.Redis) -> list[dict[str, Any]]:
    return [e for e in admin.acl_log(count=1000) if e["username"] in (SHARED, OWN)]


@pytest.fixture(scope="module")
def admin(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """The server's default user; the workers' users exist while the module runs."""
    with redis.Redis(port=redis_server.port) as client:
        client.execute_command(*setuser_command(SHARED, PASSWORD))
        client.execute_command(*setuser_command(OWN, PASSWORD, worker_id="beta"))
        yield client
        client.acl_deluser(SHARED, OWN)


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes], admin: redis.Redis) -> Iterator[Fleet]:
    """Two hosts: alpha's worker (llama3) as the shared user, beta's (qwen2) as the user
    bound to it."""
    fleet = new_fleet(redis_server, stack_log)
    try:
        hosts = [fleet.standin("llama3"), fleet.standin("qwen2", token_delay=0.01)]
        fleet.start_api()
        admin.acl_log_reset()
        fleet.worker(hosts[0], worker_id="alpha", celery_broker_url=user_url(fleet, SHARED))
        fleet.worker(hosts[1], worker_id="beta", celery_broker_url=user_url(fleet, OWN))
        fleet.wait_for_models("llama3:latest", "qwen2:latest")
        yield fleet
    finally:
        fleet.stop()


def test_workers_as_acl_users_serve_every_kind_of_job(
    fleet: Fleet, client: ollama.Client, admin: redis.Redis
) -> None:
    assert client.generate(model="llama3", prompt="hi").done  # on alpha
    parts = list(
        client.chat(model="qwen2", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert parts[-1].done and "".join(p.message.content or "" for p in parts)  # on beta
    with httpx.stream("POST", f"{fleet.url}/api/generate", json={"model": "llama3"}) as r:
        next(r.iter_lines())  # a load: the client leaves, the job is cancelled
    data = bytes(range(256)) * (6 * (1 << 20) // 256)  # beyond a window of chunks
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert (
        httpx.post(f"{fleet.url}/api/blobs/{digest}", content=data, timeout=30).status_code == 201
    )
    assert all(host.has_blob(digest) for host in fleet.standins)
    assert list(client.pull("phi3", stream=True))[-1].status == "success"
    fleet.wait_for_models("phi3:latest", workers=2)  # both re-registered, queues followed
    assert client.delete("phi3").status == "success"
    assert denials(admin) == []


@pytest.fixture
def as_worker(fleet: Fleet) -> Iterator[Callable[[str], redis.Redis]]:
    clients: list[redis.Redis] = []

    def connect(user: str) -> redis.Redis:
        clients.append(redis.Redis.from_url(user_url(fleet, user)))
        return clients[-1]

    yield connect
    for connection in clients:
        connection.close()


@pytest.mark.parametrize("user", [SHARED, OWN])
def test_what_a_worker_may_not_do_is_refused(
    as_worker: Callable[[str], redis.Redis], admin: redis.Redis, user: str
) -> None:
    admin.hset(KEYS, "h", "{}")
    worker = as_worker(user)
    queue = model_queue("llama3:latest")
    forbidden: list[tuple[Any, ...]] = [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("PUBSUB", "CHANNELS"),
        ("MONITOR",),
        ("LPUSH", queue, "job"),
        ("RPUSH", queue, "job"),
        ("LMOVE", queue, queue, "LEFT", "RIGHT"),
        ("RPOPLPUSH", queue, queue),
        ("GET", KEYS),
        ("HGETALL", KEYS),
        ("HGETALL", "oshepherd:usage:key:2026-01-01"),
        ("GET", "oshepherd:limits:key"),
        ("EVAL", "return 1", "0"),
        ("PSUBSCRIBE", "oshepherd:job:*"),
    ]
    for command in forbidden:
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.execute_command(*command)
    # A script runs with its caller's rights: no push from Lua either.
    push = worker.script_load("return redis.call('LPUSH', KEYS[1], 'job')")
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        worker.evalsha(push, 1, queue)
    assert worker.brpop([queue], timeout=0.01) is None  # what it may do


def test_a_user_bound_to_one_worker_touches_no_other(
    as_worker: Callable[[str], redis.Redis],
) -> None:
    beta = as_worker(OWN)
    assert beta.brpop([worker_queue("beta")], timeout=0.01) is None
    with pytest.raises(redis.exceptions.NoPermissionError):
        beta.brpop([worker_queue("alpha")], timeout=0.01)
    with pytest.raises(redis.exceptions.NoPermissionError):
        beta.set(worker_key("alpha"), "{}")


def test_the_printed_command_makes_the_same_user(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    """``oshepherd worker-acl``'s line, fed to redis-cli as a user would, sets the rules the
    tests' users have (control bytes of the per-worker queues included)."""
    cli = [sys.executable, "-m", "oshepherd", "worker-acl", "--user", "printed"]
    line = subprocess.run(
        [*cli, "--password", PASSWORD, "--worker-id", "beta"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    redis_cli = Path(redis_executable()).with_name("redis-cli")
    subprocess.run([redis_cli, "-p", str(redis_server.port)], input=line, text=True, check=True)
    try:
        printed, own = admin.acl_getuser("printed"), admin.acl_getuser(OWN)
        assert printed is not None and own is not None
        for field in ("keys", "channels", "commands", "passwords"):
            assert printed[field] == own[field]
    finally:
        admin.acl_deluser("printed")
