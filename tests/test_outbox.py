"""The worker's outbox against a fake publisher: what frames leave, in which order."""

from __future__ import annotations

import asyncio

import pytest

from oshepherd.protocol import Data, End, Error, Frame, Head, Ping, decode_frame
from oshepherd.worker.outbox import Outbox

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]

CHANNEL = "oshepherd:job:api:j1"
NDJSON = "application/x-ndjson"


class Publisher:
    """Redis's PUBLISH, recorded: the frames as the API would decode them."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()

    async def publish(self, channel: str, message: bytes) -> int:
        assert channel == CHANNEL
        self.frames.put_nowait(decode_frame(message))
        return 1

    async def next(self) -> Frame:
        async with asyncio.timeout(5):
            return await self.frames.get()

    def sent(self) -> list[Frame]:
        frames = []
        while not self.frames.empty():
            frames.append(self.frames.get_nowait())
        return frames


def outbox(publisher: Publisher, ping_interval: float = 60.0, attempt: int = 0) -> Outbox:
    return Outbox(publisher.publish, CHANNEL, attempt, ping_interval=ping_interval)


async def test_a_whole_answer_written_at_once_leaves_as_one_last_head() -> None:
    publisher = Publisher()
    box = outbox(publisher)
    box.start(200, "application/json; charset=utf-8")
    box.write(b'{"model":"m",')
    box.write(b'"done":true}')  # no newline: a non-streamed answer
    box.finish()
    await box.pump()
    assert publisher.sent() == [
        Head(
            seq=1,
            attempt=0,
            body=b'{"model":"m","done":true}',
            status=200,
            content_type="application/json; charset=utf-8",
            last=True,
        ),
    ]


async def test_complete_lines_leave_as_they_come_and_the_rest_with_the_end() -> None:
    publisher = Publisher()
    box = outbox(publisher, attempt=1)
    pump = asyncio.create_task(box.pump())
    box.start(200, NDJSON)
    box.write(b'{"n":1}\n{"n"')
    assert await publisher.next() == Head(
        seq=1, attempt=1, body=b'{"n":1}\n', status=200, content_type=NDJSON, last=False
    )
    box.write(b':2}\n{"n":3}\n{"n":')
    assert await publisher.next() == Data(seq=2, attempt=1, body=b'{"n":2}\n{"n":3}\n')
    box.write(b"4}")
    box.finish()
    await pump
    assert publisher.sent() == [End(seq=3, attempt=1, body=b'{"n":4}')]


async def test_server_sent_events_leave_whole() -> None:
    publisher = Publisher()
    box = outbox(publisher)
    pump = asyncio.create_task(box.pump())
    box.start(200, "text/event-stream")
    box.write(b"data: {}\n\ndata: {")
    head = await publisher.next()
    assert isinstance(head, Head) and head.body == b"data: {}\n\n"
    box.write(b"}\n\ndata: [DONE]\n\n")
    box.finish()
    await pump
    assert publisher.sent() == [End(seq=2, attempt=0, body=b"data: {}\n\ndata: [DONE]\n\n")]


async def test_a_failure_before_the_head_is_one_retryable_error() -> None:
    publisher = Publisher()
    box = outbox(publisher)
    box.fail(502, "cannot reach its Ollama", retry=True)
    await box.pump()
    assert publisher.sent() == [
        Error(seq=1, attempt=0, status=502, error="cannot reach its Ollama", retry=True)
    ]


async def test_a_failure_mid_stream_sends_the_complete_lines_then_the_error() -> None:
    publisher = Publisher()
    box = outbox(publisher)
    pump = asyncio.create_task(box.pump())
    box.start(200, NDJSON)
    box.write(b'{"n":1}\n')
    assert isinstance(await publisher.next(), Head)
    box.write(b'{"n":2}\n{"n":')  # the partial line never leaves: no broken JSON
    box.fail(502, "stream broke")
    await pump
    assert publisher.sent() == [
        Data(seq=2, attempt=0, body=b'{"n":2}\n'),
        Error(seq=3, attempt=0, status=502, error="stream broke", retry=False),
    ]


async def test_a_silent_ollama_is_pinged_over_and_the_sequence_has_no_gap() -> None:
    publisher = Publisher()
    box = outbox(publisher, ping_interval=0.01)
    pump = asyncio.create_task(box.pump())
    assert await publisher.next() == Ping(seq=1, attempt=0)
    assert await publisher.next() == Ping(seq=2, attempt=0)
    box.start(200, NDJSON)
    box.write(b"{}\n")
    box.finish()
    await pump
    frames = publisher.sent()
    assert isinstance(frames[-1], Head) and frames[-1].last
    assert [f.seq for f in frames] == list(range(3, 3 + len(frames)))
