"""API_PROCESSES=2 (``start-api --workers 2``): two API processes on one port, each with its
own Pub/Sub connection. Cancellation, withdrawal, re-runs and model management work
whichever process a request lands on, and requests land on both.

Which process served a request is read from Redis: a job names its API process's reply
channel (``oshepherd:job:<api id>:<job id>``), seen in a queued message or on Pub/Sub. The
fleet has a Redis of its own, so that every channel and pattern there is its own.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import IO, Any

import httpx
import orjson
import psutil
import pytest
import redis

from oshepherd.protocol import PREFIX, PRIORITY_STEP, model_queue, queue_key
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import WORKER_SETTINGS, tag_names

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

PROCESSES = 2
GENERATE = "/api/generate"
SLOW = "slow:1b"  # on a host whose worker has one slot: a second job waits in its queue
API_ID = re.compile(rf"{PREFIX}:job:(\w+):")


class Channels:
    """Every job reply channel published on, in order (a pattern subscription of this
    process, on a thread)."""

    def __init__(self, client: redis.Redis) -> None:
        self.seen: list[str] = []
        self._pubsub = client.pubsub()
        self._pubsub.psubscribe(**{f"{PREFIX}:job:*": self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.005, daemon=True)

    def _on_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        if channel not in self.seen:
            self.seen.append(channel)

    def mark(self) -> int:
        return len(self.seen)

    def since(self, mark: int) -> list[str]:
        return self.seen[mark:]

    def stop(self) -> None:
        self._thread.stop()
        self._thread.join(5)
        self._pubsub.close()


def api_ids(texts: Iterable[str | bytes]) -> set[str]:
    """The API processes named in job channels or queued messages."""
    found: set[str] = set()
    for text in texts:
        found |= set(API_ID.findall(text.decode() if isinstance(text, bytes) else text))
    return found


@pytest.fixture(scope="module")
def scene(stack_log: IO[bytes]) -> Iterator[tuple[Fleet, Channels, redis.Redis]]:
    """Hosts alpha (llama3, shared:7b) and beta (qwen2:7b, shared:7b), 4 slots each; gamma
    (slow:1b) with one slot; the API as two processes, both subscribed."""
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedRedis())
        client = stack.enter_context(redis.Redis.from_url(server.url))
        channels = Channels(client)
        stack.callback(channels.stop)
        fleet = stack.enter_context(Fleet(server.url, stack_log, worker=WORKER_SETTINGS))
        hosts = [
            fleet.standin("llama3", "shared:7b"),
            fleet.standin("qwen2:7b", "shared:7b"),
            fleet.standin(SLOW),
        ]
        patterns = int(client.execute_command("PUBSUB", "NUMPAT"))
        fleet.start_api(api_processes=PROCESSES)
        for host, worker_id in zip(hosts, ("alpha", "beta", "gamma"), strict=True):
            fleet.worker(host, worker_id=worker_id, concurrency=1 if host is hosts[2] else 4)
        fleet.wait_for_models("llama3:latest", "qwen2:7b", "shared:7b", SLOW)
        wait_until(
            lambda: client.execute_command("PUBSUB", "NUMPAT") == patterns + PROCESSES,
            20,
            "every API process subscribed to its reply channels",
        )
        yield fleet, channels, client


@pytest.fixture
def fleet(scene: tuple[Fleet, Channels, redis.Redis]) -> Fleet:
    for host in scene[0].standins:
        host.reset_counters()
        host.latency, host.tokens, host.token_delay = 0.0, 5, 0.0
    return scene[0]


@pytest.fixture
def channels(scene: tuple[Fleet, Channels, redis.Redis]) -> Channels:
    return scene[1]


@pytest.fixture
def client(scene: tuple[Fleet, Channels, redis.Redis]) -> redis.Redis:
    return scene[2]


def hanging(fleet: Fleet, body: dict[str, Any]) -> socket.socket:
    """A /api/generate sent on a connection of its own that nobody reads: closing it is the
    client hanging up."""
    url = httpx.URL(fleet.url)
    assert url.port is not None
    sock = socket.create_connection((url.host, url.port), timeout=5)
    payload = orjson.dumps(body)
    head = (
        f"POST {GENERATE} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def queued(client: redis.Redis, model: str) -> list[bytes | str]:
    """The messages waiting in ``model``'s queue (no keys: normal priority)."""
    return list(client.lrange(queue_list(model), 0, -1))


def queue_list(model: str) -> str:
    return queue_key(model_queue(model), PRIORITY_STEP["normal"])


def prompts(host: StandIn) -> list[str]:
    return [str(body.get("prompt")) for _, path, body in host.requests if path == GENERATE]


def until_both(attempt: Callable[[int], set[str]], rounds: int = 6) -> set[str]:
    """Run ``attempt(n)`` (it returns the API processes its requests landed on) until both
    processes served; AssertionError if they did not within ``rounds`` attempts."""
    served: set[str] = set()
    for n in range(rounds):
        served |= attempt(n)
        if len(served) == PROCESSES:
            return served
    raise AssertionError(f"requests landed on {len(served)} API process(es) in {rounds} rounds")


def test_two_processes_share_the_port_and_both_serve(
    fleet: Fleet, channels: Channels, client: redis.Redis
) -> None:
    assert fleet.api is not None
    supervisor = psutil.Process(fleet.api.process.pid)
    servers = [p for p in supervisor.children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(servers) == PROCESSES
    body = {"model": "llama3", "prompt": "x", "stream": False}

    def serve_one(n: int) -> set[str]:
        mark = channels.mark()
        assert httpx.post(fleet.url + GENERATE, json=body, timeout=10).json()["done"] is True
        return api_ids(wait_until(lambda: channels.since(mark), 5, "the job's channel seen"))

    assert len(until_both(serve_one, rounds=40)) == PROCESSES


def test_a_client_that_hangs_up_cancels_its_running_job_on_either_process(
    fleet: Fleet, channels: Channels
) -> None:
    alpha = fleet.standins[0]
    alpha.tokens, alpha.token_delay = 1000, 0.01
    hung_up = 0

    def cancel_four(n: int) -> set[str]:
        nonlocal hung_up
        mark = channels.mark()
        sockets = [hanging(fleet, {"model": "llama3", "prompt": f"cancel {n}"}) for _ in "abcd"]
        try:
            alpha.wait_for(lambda h: h.active == 4)
            streams: list[str] = wait_until(
                lambda: channels.since(mark) if len(channels.since(mark)) >= 4 else [],
                5,
                "4 streams' channels seen",
            )
        finally:
            for sock in sockets:
                sock.close()
        hung_up += 4
        alpha.wait_for(lambda h: h.disconnects == hung_up and h.active == 0)
        return api_ids(streams)

    until_both(cancel_four)
    assert alpha.tokens_sent < alpha.disconnects * 100  # each stopped well before its end


def test_a_queued_job_whose_client_left_is_withdrawn_on_either_process(
    fleet: Fleet, client: redis.Redis
) -> None:
    gamma = fleet.standins[2]
    gamma.latency = 30.0
    occupier = hanging(fleet, {"model": SLOW, "prompt": "occupy", "stream": False})
    try:
        gamma.wait_for(lambda h: h.active == 1)

        def withdraw_four(n: int) -> set[str]:
            gone = [hanging(fleet, {"model": SLOW, "prompt": f"gone {n}"}) for _ in "abcd"]
            try:
                waiting = wait_until(lambda: len(queued(client, SLOW)) == 4, 5, "4 jobs queued")
                assert waiting
                served = api_ids(queued(client, SLOW))
            finally:
                for sock in gone:
                    sock.close()
            wait_until(lambda: not queued(client, SLOW), 5, "the queued jobs withdrawn")
            return served

        until_both(withdraw_four)
    finally:
        occupier.close()
    gamma.wait_for(lambda h: h.active == 0)
    gamma.latency = 0.0
    after = {"model": SLOW, "prompt": "after", "stream": False}
    assert httpx.post(fleet.url + GENERATE, json=after, timeout=10).status_code == 200
    assert prompts(gamma) == ["occupy", "after"]


def test_a_job_lost_with_its_worker_before_it_started_runs_once_on_either_process(
    fleet: Fleet, client: redis.Redis
) -> None:
    gamma = fleet.standins[2]

    def lose_four(n: int) -> set[str]:
        gamma.latency = 30.0
        occupier = hanging(fleet, {"model": SLOW, "prompt": f"occupy {n}", "stream": False})
        lost = [f"lost {n}{letter}" for letter in "abcd"]
        with ThreadPoolExecutor(4) as pool:
            try:
                gamma.wait_for(lambda h: h.active == 1)
                gamma.latency = 0.0
                answers = pool.map(
                    lambda p: httpx.post(
                        fleet.url + GENERATE,
                        json={"model": SLOW, "prompt": p, "stream": False},
                        timeout=30,
                    ),
                    lost,
                )
                wait_until(lambda: len(queued(client, SLOW)) == 4, 5, "4 jobs queued")
                # A worker takes the jobs off the queue (as BRPOP does) and dies before
                # starting them.
                stolen = client.rpop(queue_list(SLOW), 4)
                assert isinstance(stolen, list) and len(stolen) == 4
            finally:
                occupier.close()
            assert all(answer.status_code == 200 for answer in answers)
        # The dead worker's attempts, were they to start after all, are refused.
        gamma.wait_for(lambda h: h.active == 0)
        client.lpush(queue_list(SLOW), *stolen)
        after = {"model": SLOW, "prompt": f"after {n}", "stream": False}
        assert httpx.post(fleet.url + GENERATE, json=after, timeout=10).status_code == 200
        ran = prompts(gamma)
        assert all(ran.count(p) == 1 for p in lost) and ran[-1] == f"after {n}"
        return api_ids(stolen)

    until_both(lose_four, rounds=4)


def test_pull_and_delete_reach_every_host_from_either_process(
    fleet: Fleet, channels: Channels
) -> None:
    alpha, beta = fleet.standins[:2]
    pulled_by: set[str] = set()
    deleted_by: set[str] = set()

    def through(n: int, method: str, path: str, body: dict[str, Any]) -> set[str]:
        mark = channels.mark()
        answer = httpx.request(method, fleet.url + path, json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        assert alpha.count(path) == beta.count(path) == n + 1
        return api_ids(channels.since(mark))

    def pull_and_delete(n: int) -> set[str]:
        model = f"fresh{n}:1b"
        pulled_by.update(through(n, "POST", "/api/pull", {"model": model, "stream": False}))
        # Routable at once from either process: a process that has not seen it yet
        # rereads the registry on the miss.
        generate = {"model": model, "prompt": "x", "stream": False}
        with ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(lambda _: httpx.post(fleet.url + GENERATE, json=generate), range(4))
            )
        assert all(reply.json().get("done") is True for reply in replies), [r.text for r in replies]
        deleted_by.update(through(n, "DELETE", "/api/delete", {"model": model}))
        # The other process's view catches up within its registry refresh (1 s).
        wait_until(lambda: all(model not in tag_names(fleet.url) for _ in range(4)), 5, "gone")
        return pulled_by & deleted_by

    until_both(pull_and_delete, rounds=12)


def test_sigterm_stops_every_process_after_in_flight_streams_finish(
    stack_log: IO[bytes],
) -> None:
    with EmbeddedRedis() as server, Fleet(server.url, stack_log, worker=WORKER_SETTINGS) as fleet:
        host = fleet.standin("llama3", tokens=20, token_delay=0.05)
        api = fleet.start_api(api_processes=PROCESSES)
        fleet.worker(host)
        fleet.wait_for_models("llama3:latest")
        processes = psutil.Process(api.process.pid).children()
        lines: list[list[str]] = [[], [], [], []]
        started = threading.Barrier(len(lines) + 1)

        def stream(out: list[str]) -> None:
            body = {"model": "llama3", "prompt": "x"}
            with httpx.stream("POST", fleet.url + GENERATE, json=body, timeout=30) as response:
                started.wait(10)
                out.extend(response.iter_lines())

        threads = [threading.Thread(target=stream, args=(out,)) for out in lines]
        for thread in threads:
            thread.start()
        started.wait(10)
        api.signal(signal.SIGTERM)
        assert api.process.wait(timeout=30) == 0
        for thread in threads:
            thread.join(10)
        assert all(len(out) == 21 and orjson.loads(out[-1])["done"] for out in lines)
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert alive == []
