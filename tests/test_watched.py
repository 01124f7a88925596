"""A response racing its work against the client: a hang-up cancels the work, and an
exception in the work is logged and still ends the answer in the surface's shape."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from oshepherd.api.watched import WatchedResponse, until_disconnect

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]

NDJSON = [(b"content-type", b"application/x-ndjson")]
SSE = [(b"content-type", b"text/event-stream")]


class Broken(WatchedResponse):
    """Sends ``headers`` (unless None), one line, then fails as a bug would."""

    def __init__(self, path: str, headers: list[tuple[bytes, bytes]] | None) -> None:
        super().__init__(path)
        self.headers_to_send = headers
        self.closed = False

    def __str__(self) -> str:
        return "job j42"

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.headers_to_send is not None:
            start = {"type": "http.response.start", "status": 200, "headers": self.headers_to_send}
            await send(start)
            await send({"type": "http.response.body", "body": b"{}\n", "more_body": True})
        raise KeyError("status")

    async def close(self) -> None:
        self.closed = True


class Slow(Broken):
    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(60)


async def run(response: WatchedResponse, *, hang_up: bool = False) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        if hang_up:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "path": response.path}
    await response(scope, receive, send)
    return sent


async def test_a_failure_mid_stream_is_logged_with_its_job_and_ends_with_an_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = Broken("/api/chat", NDJSON)
    with caplog.at_level(logging.ERROR, "oshepherd.api.watched"):
        sent = await run(response)
    assert [m.get("body") for m in sent[1:]] == [b"{}\n", b'{"error":"internal error"}\n']
    assert sent[-1].get("more_body", False) is False
    assert response.closed
    (record,) = caplog.records
    assert "job j42" in record.getMessage() and record.exc_info is not None
    assert record.exc_info[0] is KeyError


async def test_a_failure_mid_sse_stream_ends_with_an_error_event() -> None:
    sent = await run(Broken("/v1/chat/completions", SSE))
    last = sent[-1]["body"]
    assert last.startswith(b"data: ") and last.endswith(b"\n\n")
    assert orjson.loads(last[6:])["error"]["message"] == "internal error"


async def test_a_failure_before_any_byte_is_a_500_in_the_surface_shape() -> None:
    sent = await run(Broken("/v1/embeddings", None))
    assert sent[0]["status"] == 500
    assert orjson.loads(sent[1]["body"])["error"]["type"] == "api_error"
    sent = await run(Broken("/api/embed", None))
    assert (sent[0]["status"], orjson.loads(sent[1]["body"])) == (500, {"error": "internal error"})


async def test_a_client_that_hangs_up_cancels_the_work_and_closes_it() -> None:
    response = Slow("/api/generate", NDJSON)
    assert await run(response, hang_up=True) == []
    assert response.closed


async def test_a_cancel_from_elsewhere_stays_a_cancel_and_stops_the_watch() -> None:
    """The server cancelling the request (its shutdown) is no hang-up: the work and the
    watch on ``receive`` both end, and the caller sees CancelledError, not ClientDisconnect."""
    watching = asyncio.Event()
    stopped = asyncio.Event()

    async def receive() -> Message:
        watching.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        raise AssertionError("unreachable")

    task = asyncio.create_task(until_disconnect(receive, asyncio.sleep(60)))
    await asyncio.wait_for(watching.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(stopped.wait(), 5)


async def test_a_hang_up_during_the_work_is_client_disconnect() -> None:
    hang_up = asyncio.Event()

    async def receive() -> Message:
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def work() -> str:
        hang_up.set()
        await asyncio.sleep(60)
        return "never"

    with pytest.raises(ClientDisconnect):
        await until_disconnect(receive, work())  # in this task: the watch cancels it
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancel was taken back
