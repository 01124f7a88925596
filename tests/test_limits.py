"""The default body limit fits real vision chats (MAX_BODY_BYTES, 64 MiB): a chat whose
history holds ten 3 MiB photos reaches the host; a body past the limit is a 413 in the
route's own error shape."""

from __future__ import annotations

import base64
import http.client
import os
from collections.abc import Iterator
from typing import IO

import httpx
import ollama
import orjson
import pytest

from oshepherd.config import ApiSettings
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet
from tests.conftest import one_host
from tests.test_bad_input import assert_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

MiB = 1024 * 1024
PHOTOS = 10
PHOTO_BYTES = 3 * MiB


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    """One host and an API with default settings (no MAX_BODY_BYTES)."""
    with one_host(redis_server, stack_log, "llava") as fleet:
        yield fleet


def test_a_chat_holding_ten_3_mib_photos_reaches_the_host(fleet: Fleet) -> None:
    """Through ollama-python, which sends the photos in base64: a 40 MiB JSON body."""
    photos = [os.urandom(PHOTO_BYTES) for _ in range(PHOTOS)]
    messages = [
        {"role": "user", "content": f"photo {n}", "images": [photo]}
        for n, photo in enumerate(photos)
    ]
    client = ollama.Client(host=fleet.url, timeout=60)
    reply = client.chat(model="llava", messages=messages)
    assert reply.done is True and reply.message.content
    (body,) = [b for _, path, b in fleet.standins[0].requests if path == "/api/chat"]
    assert len(orjson.dumps(body)) > 40 * MiB
    received = [message["images"] for message in body["messages"]]
    assert received == [[base64.b64encode(photo).decode()] for photo in photos]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_body_past_the_default_limit_is_413_in_the_routes_shape(fleet: Fleet, path: str) -> None:
    limit = ApiSettings.model_fields["max_body_bytes"].default
    status, content_type, content = declared_only(fleet.url, path, limit + 1)
    assert status == 413
    assert_error(status, content_type, content, path)


def declared_only(url: str, path: str, length: int) -> tuple[int, str, bytes]:
    """The answer to a POST that declares ``length`` bytes of JSON and sends none of them
    (the API refuses it from the header alone)."""
    address = httpx.URL(url)
    connection = http.client.HTTPConnection(address.host, address.port, timeout=10)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()
