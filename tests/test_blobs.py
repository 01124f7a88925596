"""Blob uploads to the fleet (``oshepherd.api.blobs``): two hosts, a worker each, the bytes
through Redis; ollama-python's create_blob and create, httpx, and a raw socket that hangs up."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import ollama
import psutil
import pytest
import redis

from oshepherd.api.blobs import CHUNK, WINDOW
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from tests.conftest import two_hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

MIB = 1 << 20


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with two_hosts(redis_server, stack_log, ("llama3",), ("llama3",), ("alpha", "beta")) as fleet:
        fleet.wait_for_models("llama3:latest", workers=2)  # both are targets from the start
        yield fleet


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def blob_keys(fleet: Fleet) -> list[bytes]:
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        return list(client.scan_iter("oshepherd:blob:*"))


def write_blob(path: Path, mib: int) -> str:
    """A file of ``mib`` MiB (each MiB different), written a MiB at a time; its digest."""
    sha = hashlib.sha256()
    with path.open("wb") as out:
        for i in range(mib):
            block = i.to_bytes(8, "big") * (MIB // 8)
            sha.update(block)
            out.write(block)
    return f"sha256:{sha.hexdigest()}"


def rss(fleet: Fleet) -> list[int]:
    """The resident set of the API and of each worker, in bytes."""
    processes = [c.process for c in fleet.stack.components]
    return [int(psutil.Process(p.pid).memory_info().rss) for p in processes]


class Lengths:
    """The longest of the upload lists seen while the block runs, sampled every 10 ms."""

    def __init__(self, fleet: Fleet) -> None:
        self._client = redis.Redis.from_url(fleet.stack.redis_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.longest = 0

    def __enter__(self) -> Lengths:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            for key in self._client.scan_iter("oshepherd:blob:*:chunks:*"):
                self.longest = max(self.longest, int(self._client.llen(key)))


def test_create_from_a_200_mib_gguf_on_two_hosts(
    client: ollama.Client, fleet: Fleet, tmp_path: Path
) -> None:
    path = tmp_path / "model.gguf"
    digest = write_blob(path, 200)
    before = rss(fleet)
    assert httpx.head(f"{fleet.url}/api/blobs/{digest}").status_code == 404
    with Lengths(fleet) as lists:
        assert client.create_blob(path) == digest  # ollama-python: POST, no HEAD first
    # Bounded: a window of chunks per host in Redis (and the end), a few MiB per process.
    assert 0 < lists.longest <= WINDOW + 1
    grown = [(after - was) / MIB for after, was in zip(rss(fleet), before, strict=True)]
    assert max(grown) < 16, f"the API and workers grew by {grown} MiB"
    assert all(host.has_blob(digest) for host in fleet.standins)
    assert httpx.head(f"{fleet.url}/api/blobs/{digest}").status_code == 200
    progress = client.create(model="from-gguf", files={"x.gguf": digest})
    assert progress.status == "success"
    assert "from-gguf:latest" in {m.model for m in client.list().models}
    assert blob_keys(fleet) == []
    # Every host has it now: 200, as Ollama answers for a blob it has.
    response = httpx.post(f"{fleet.url}/api/blobs/{digest}", content=path.read_bytes()[:MIB])
    assert response.status_code == 200


def test_a_slow_host_holds_the_upload_to_a_window(fleet: Fleet) -> None:
    beta = fleet.standins[1]
    data = bytes(range(256)) * (24 * MIB // 256)
    beta.blob_read_delay = 0.002  # 64 KiB pieces: about 30 MiB/s
    try:
        with Lengths(fleet) as lists:
            url = f"{fleet.url}/api/blobs/{digest_of(data)}"
            response = httpx.post(url, content=data, timeout=30)
    finally:
        beta.blob_read_delay = 0.0
    assert response.status_code == 201
    # The API waited for beta's worker: its list grew (a host that keeps up leaves one
    # chunk at most), never beyond the window (the end may follow a full window).
    assert 2 <= lists.longest <= WINDOW + 1
    assert all(host.has_blob(digest_of(data)) for host in fleet.standins)


def test_a_wrong_digest_is_400_naming_the_hosts_and_leaves_no_blob(fleet: Fleet) -> None:
    data = b"not the blob named" * MIB
    named, got = f"sha256:{'ab' * 32}", digest_of(data)
    response = httpx.post(f"{fleet.url}/api/blobs/{named}", content=data, timeout=30)
    assert response.status_code == 400
    mismatch = f'digest mismatch, expected "{named}", got "{got}"'
    assert response.json() == {"error": f"blob upload failed on alpha, beta: {mismatch}"}
    # Not even under the digest the bytes have (where Ollama itself would keep them): the
    # hosts never saw the end of the body.
    for host in fleet.standins:
        assert not host.has_blob(named) and not host.has_blob(got)
    assert blob_keys(fleet) == []


def test_a_client_that_hangs_up_leaves_nothing(fleet: Fleet) -> None:
    digest = f"sha256:{'cd' * 32}"
    uploads = [host.count(f"/api/blobs/{digest}") for host in fleet.standins]
    port = int(fleet.url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        sock.sendall(head.encode() + f"Content-Length: {1 << 40}\r\n\r\n".encode())
        for _ in range(2 * WINDOW):  # beyond a window: the workers take chunks
            sock.sendall(b"\0" * CHUNK)
        wait_until(lambda: blob_keys(fleet) != [], 10, "the upload under way")
    wait_until(lambda: blob_keys(fleet) == [], 10, "no key of the upload left in Redis")

    def ended() -> bool:  # the stand-in records a request as it ends
        counts = [host.count(f"/api/blobs/{digest}") for host in fleet.standins]
        return all(n > before for n, before in zip(counts, uploads, strict=True))

    wait_until(ended, 10, "both hosts' requests broken off")
    assert not any(host.has_blob(digest) for host in fleet.standins)


def test_a_failing_target_is_named_and_the_others_get_the_blob(
    client: ollama.Client, fleet: Fleet, tmp_path: Path
) -> None:
    alpha, beta = fleet.standins
    path = tmp_path / "model.gguf"
    digest = write_blob(path, 3)
    beta.fail_next(500, "write /models/blobs: no space left on device")
    with pytest.raises(ollama.ResponseError) as info:
        client.create_blob(path)
    assert info.value.status_code == 500
    error = "blob upload failed on beta: write /models/blobs: no space left on device"
    assert info.value.error == error
    assert alpha.has_blob(digest) and not beta.has_blob(digest)
    assert httpx.head(f"{fleet.url}/api/blobs/{digest}").status_code == 404
    # Aimed at beta alone, the upload completes the fleet.
    url = f"{fleet.url}/api/blobs/{digest}?workers=beta"
    assert httpx.post(url, content=path.read_bytes()).status_code == 201
    assert httpx.head(f"{fleet.url}/api/blobs/{digest}").status_code == 200
    assert blob_keys(fleet) == []


def test_an_empty_blob_and_bad_digests(fleet: Fleet) -> None:
    empty = digest_of(b"")
    assert httpx.post(f"{fleet.url}/api/blobs/{empty}", content=b"").status_code == 201
    assert all(host.has_blob(empty) for host in fleet.standins)
    response = httpx.post(f"{fleet.url}/api/blobs/sha256:nothex", content=b"x")
    assert (response.status_code, response.json()) == (400, {"error": "invalid digest format"})
    response = httpx.post(f"{fleet.url}/api/blobs/{empty}?workers=nobody", content=b"")
    assert (response.status_code, response.json()) == (400, {"error": "unknown worker 'nobody'"})
