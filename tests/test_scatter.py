"""Scatter-gather embeddings: long inputs split over every worker holding the model."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import ollama
import openai
import orjson
import pytest

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import new_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

MODEL = "embedder"
TEXTS = [f"text number {i}" for i in range(25)]  # batches of 4: six full ones and one of 1
BATCHES = 7
# Long enough that a batch still running when it should not be is seen, never waited out.
SLOW = 30.0


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    fleet = new_fleet(redis_server, stack_log)
    a, b = fleet.standin(MODEL), fleet.standin(MODEL)
    fleet.start_api(embed_batch_size=4)
    fleet.worker(a)
    fleet.worker(b)
    fleet.wait_for_models("embedder:latest", workers=2)  # both, or a scatter sees one's slots
    yield fleet
    fleet.stop()


@pytest.fixture
def hosts(fleet: Fleet) -> Iterator[list[StandIn]]:
    for host in fleet.standins:
        host.reset_counters()
    yield fleet.standins
    for host in fleet.standins:
        host.latency = 0.0
    wait_until(lambda: not any(h.active for h in fleet.standins), 15, "hosts idle")


def bodies(hosts: list[StandIn], path: str = "/api/embed") -> list[dict[str, Any]]:
    return [body for host in hosts for _, p, body in list(host.requests) if p == path]


def alone(fleet: Fleet) -> list[list[float]]:
    """Each text embedded by itself: what the batched answer must equal."""
    client = ollama.Client(host=fleet.url)
    return [list(client.embed(model=MODEL, input=text).embeddings[0]) for text in TEXTS]


def busy(hosts: list[StandIn]) -> None:
    """Keep every batch that reaches a host there long enough that both hosts must take
    some: longer than WARM_WAIT (0.3 s), after which a host that has not loaded the model
    (warm first) takes a waiting batch too."""
    for host in hosts:
        host.latency = 1.0


def test_batches_spread_over_both_hosts_and_come_back_in_order(
    fleet: Fleet, hosts: list[StandIn]
) -> None:
    busy(hosts)
    reply = ollama.Client(host=fleet.url).embed(model="EMBEDDER", input=TEXTS)
    counts = [host.count("/api/embed") for host in hosts]
    assert sum(counts) == BATCHES and all(counts)
    sizes = sorted(len(body["input"]) for body in bodies(hosts))
    assert sizes == [1, 4, 4, 4, 4, 4, 4]
    assert reply.model == "EMBEDDER"  # echoed as sent
    assert reply.prompt_eval_count == 25
    assert reply.load_duration == 1000  # the longest load, not the sum of seven
    assert reply.total_duration and reply.total_duration > 0
    for host in hosts:
        host.latency = 0.0
    assert [list(v) for v in reply.embeddings] == alone(fleet)


def test_one_batch_or_less_goes_through_untouched(fleet: Fleet, hosts: list[StandIn]) -> None:
    body = {"model": MODEL, "input": TEXTS[:4], "truncate": True, "keep_alive": "1m"}
    reply = httpx.post(fleet.url + "/api/embed", json=body).json()
    assert sum(host.count("/api/embed") for host in hosts) == 1
    assert bodies(hosts) == [body]
    assert reply["total_duration"] == 3000  # the host's own figures, not recomputed


def test_other_fields_reach_every_batch(fleet: Fleet, hosts: list[StandIn]) -> None:
    httpx.post(fleet.url + "/api/embed", json={"model": MODEL, "input": TEXTS, "dimensions": 8})
    sent = bodies(hosts)
    assert len(sent) == BATCHES
    assert all(b["dimensions"] == 8 and b["model"] == MODEL for b in sent)


def test_the_first_failing_batch_is_the_answer_and_cancels_the_rest(
    fleet: Fleet, hosts: list[StandIn]
) -> None:
    a, b = hosts
    a.latency = b.latency = SLOW
    a.fail_next(500, "llama runner process has terminated")
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=fleet.url).embed(model=MODEL, input=TEXTS)
    assert info.value.status_code == 500
    assert info.value.error == "llama runner process has terminated"
    assert_all_cut_off(hosts, failed=1)


def test_a_client_that_hangs_up_cancels_every_batch(fleet: Fleet, hosts: list[StandIn]) -> None:
    for host in hosts:
        host.latency = SLOW
    url = urlsplit(fleet.url)
    body = orjson.dumps({"model": MODEL, "input": TEXTS})
    head = f"POST /api/embed HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(head.encode() + body)
        wait_until(lambda: sum(h.active for h in hosts) == BATCHES, 15, "every batch on a host")
    assert_all_cut_off(hosts, failed=0)


def assert_all_cut_off(hosts: list[StandIn], failed: int, path: str = "/api/embed") -> None:
    """Every batch that reached a host, except the ``failed`` ones, was cut off, not finished."""
    wait_until(
        lambda: (
            not any(h.active for h in hosts)
            and sum(h.disconnects for h in hosts) == len(bodies(hosts, path)) - failed
        ),
        15,
        "batches cancelled",
    )
    assert not any(h.completed for h in hosts)


def test_unknown_model_is_a_404_on_both_surfaces(fleet: Fleet, hosts: list[StandIn]) -> None:
    with pytest.raises(ollama.ResponseError) as native:
        ollama.Client(host=fleet.url).embed(model="nope:1b", input=TEXTS)
    assert (native.value.status_code, native.value.error) == (404, "model 'nope:1b' not found")
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope:1b", input=TEXTS)


def test_openai_embeddings_are_scattered_too(fleet: Fleet, hosts: list[StandIn]) -> None:
    busy(hosts)
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0)
    reply = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    counts = [host.count("/v1/embeddings") for host in hosts]
    assert sum(counts) == BATCHES and all(counts)
    assert [d.index for d in reply.data] == list(range(25))
    assert (reply.model, reply.object) == (MODEL, "list")
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (25, 25)
    for host in hosts:
        host.latency = 0.0
    assert [d.embedding for d in reply.data] == alone(fleet)


def test_openai_failing_batch_is_an_openai_error(fleet: Fleet, hosts: list[StandIn]) -> None:
    a, b = hosts
    a.latency = b.latency = SLOW
    a.fail_next(500, "out of memory")
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model=MODEL, input=TEXTS)
    assert isinstance(info.value.body, dict) and info.value.body["message"] == "out of memory"
    assert_all_cut_off(hosts, failed=1, path="/v1/embeddings")
