"""The wire format, without Redis: frames round-trip, malformed ones are refused, and the
native enqueue's message is one kombu and Celery take for a real task message."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from celery import Celery
from celery.worker.request import Request
from kombu import Connection

from oshepherd.protocol import (
    BLOB_DATA,
    TASK_NAME,
    BlobAbort,
    BlobAck,
    BlobEnd,
    Data,
    End,
    Error,
    Frame,
    Head,
    Job,
    Ping,
    ProtocolError,
    Start,
    WorkerEntry,
    binary_body,
    blob_ack_channel,
    celery_message,
    decode_blob_part,
    decode_frame,
    job_channel,
    job_channel_pattern,
    job_id_from_channel,
)

FRAMES: list[Frame] = [
    Start(seq=0, attempt=1, worker="gpu-1"),
    Head(
        seq=1,
        attempt=0,
        body=b'{"a":1}\n',
        status=200,
        content_type="application/x-ndjson",
        last=False,
    ),
    Head(seq=1, attempt=0, body=b"{}", status=404, content_type="", last=True),
    Data(seq=2, attempt=0, body=b"data: {}\n\n"),
    End(seq=3, attempt=0, body=b'{"done":true}'),
    End(seq=3, attempt=0),
    Error(seq=4, attempt=1, status=502, error="Ollama stream broke", retry=False),
    Ping(seq=5, attempt=0),
]


def job(**fields: Any) -> Job:
    defaults: dict[str, Any] = {
        "id": "0123abcd",
        "channel": job_channel("api1", "0123abcd"),
        "method": "POST",
        "path": "/api/chat",
        "body": '{"model":"llama3","messages":[{"role":"user","content":"héllo\\n"}]}',
        "model": "llama3:latest",
        "deadline": 1e10,
        "queue": "oshepherd.model.llama3:latest",
    }
    return Job(**{**defaults, **fields})


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f"{f.kind}-{f.seq}")
def test_a_frame_round_trips(frame: Frame) -> None:
    assert decode_frame(frame.encode()) == frame


def test_the_body_travels_untouched_after_the_header() -> None:
    body = b'{"x":"\\n"}\n\xff\x00 raw bytes\n'
    raw = Data(seq=0, attempt=0, body=body).encode()
    header, _, rest = raw.partition(b"\n")
    assert orjson.loads(header) == {"kind": "data", "seq": 0, "attempt": 0}
    assert rest == body


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "malformed frame header"),
        (b'{"kind":"data","seq":0,"attempt":0}', "no JSON object header"),  # no separator
        (b"not json\n", "malformed frame header"),
        (b"[1,2]\n", "no JSON object header"),
        (b'{"kind":"nope","seq":0,"attempt":0}\n', "unknown kind 'nope'"),
        (b'{"seq":0,"attempt":0}\n', "unknown kind None"),
        (b'{"kind":"data","attempt":0}\n', "'seq' must be int"),
        (b'{"kind":"data","seq":"0","attempt":0}\n', "'seq' must be int"),
        (b'{"kind":"data","seq":true,"attempt":0}\n', "'seq' must be int"),
        (
            b'{"kind":"head","seq":1,"attempt":0,"content_type":"","last":true}\n',
            "'status' must be int",
        ),
        (
            b'{"kind":"head","seq":1,"attempt":0,"status":200,"content_type":"","last":1}\n',
            "'last' must be bool",
        ),
        (
            b'{"kind":"error","seq":1,"attempt":0,"status":502.0,"error":"x","retry":false}\n',
            "'status' must be int",
        ),
        (
            b'{"kind":"error","seq":1,"attempt":0,"status":502,"error":null,"retry":false}\n',
            "'error' must be str",
        ),
        (b'{"kind":"start","seq":0,"attempt":0}\n', "'worker' must be str"),
    ],
)
def test_a_malformed_frame_is_refused_with_the_reason(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(why)):
        decode_frame(raw)


def test_a_job_round_trips_through_a_dict_and_refuses_unknown_fields() -> None:
    original = job(attempt=1)
    assert Job.from_dict(orjson.loads(orjson.dumps(original.to_dict()))) == original
    with pytest.raises(ProtocolError, match="malformed job"):
        Job.from_dict({**original.to_dict(), "extra": 1})
    with pytest.raises(ProtocolError, match="malformed job"):
        Job.from_dict("not a dict")


def test_a_job_carries_its_body_to_ollama_as_the_client_sent_it() -> None:
    assert job().content() == (job().body.encode(), "application/json")
    upload = bytes(range(256)) * 3  # not UTF-8, not JSON
    form = "multipart/form-data; boundary=x"
    binary = job(body=binary_body(upload), content_type=form)
    over_the_wire = Job.from_dict(orjson.loads(orjson.dumps(binary.to_dict())))
    assert over_the_wire.content() == (upload, form)


def test_a_blob_upload_item_round_trips_and_refuses_garbage() -> None:
    chunk = bytes(range(256)) * 4
    data = decode_blob_part(BLOB_DATA + chunk)
    assert isinstance(data, memoryview) and data == chunk
    for item in (BlobEnd(0), BlobEnd(1 << 40), BlobAbort(400, 'digest mismatch, "x"')):
        assert decode_blob_part(item.encode()) == item
    for raw in (b"", b"x", b"e", b"e12a", b"a{", b'a{"status": 400}', b"a[]"):
        with pytest.raises(ProtocolError):
            decode_blob_part(raw)
    assert Job.from_dict({**job().to_dict(), "upload": "u1"}).upload == "u1"


def test_a_blob_ack_round_trips_on_its_apis_reply_channel() -> None:
    ack = BlobAck("worker 1", 42)
    assert BlobAck.decode(ack.encode()) == ack
    for raw in (b"", b"42", b"42 ", b"x w", b"-1 w"):
        with pytest.raises(ProtocolError):
            BlobAck.decode(raw)
    upload = job(upload="u1")  # a job of the API api1
    assert blob_ack_channel(upload) == job_channel("api1", "u1")  # its pattern covers it


def test_a_job_past_its_deadline_is_expired() -> None:
    assert job(deadline=0.0).expired()
    assert not job().expired()


def test_a_registry_entry_round_trips_and_refuses_garbage() -> None:
    entry = WorkerEntry(
        id="w1",
        hostname="gpu",
        ollama_url="http://127.0.0.1:11434",
        version="0.33.0",
        healthy=True,
        error="",
        models=[{"name": "llama3:latest"}],
        running=[],
        slots=4,
        in_flight=1,
        started_at=1.5,
        expires=2.5,
    )
    assert WorkerEntry.from_json(entry.to_json()) == entry
    for raw in (b"{", b'{"id": "w1"}', b"[]"):
        with pytest.raises(ProtocolError):
            WorkerEntry.from_json(raw)


def test_a_job_channel_names_its_job_and_matches_its_api_pattern() -> None:
    channel = job_channel("api1", "abc")
    assert job_id_from_channel(channel) == "abc"
    assert channel.startswith(job_channel_pattern("api1").rstrip("*"))


def test_kombu_and_celery_take_the_native_message_for_a_real_task_message() -> None:
    """What the worker's consumer does with an LPUSHed message: kombu's virtual transport
    turns the JSON envelope into a Message, Celery builds its task Request from it."""
    original = job()
    raw = celery_message(original)
    app = Celery("check", broker="memory://", set_as_current=False)
    app.conf.accept_content = ["json"]

    @app.task(name=TASK_NAME)
    def run_job(job: dict[str, Any]) -> None:
        """Never run here: only its name and signature matter."""

    with Connection("memory://") as connection:
        channel = connection.default_channel
        message = channel.message_to_python(orjson.loads(raw))  # as kombu's Redis transport
        assert message.content_type == "application/json"
        assert message.delivery_info["routing_key"] == original.queue
        assert message.decode() == [
            [original.to_dict()],
            {},
            {
                "callbacks": None,
                "errbacks": None,
                "chain": None,
                "chord": None,
            },
        ]
        request = Request(message, app=app, task=run_job)
    assert (request.id, request.name) == (original.id, TASK_NAME)
    assert request.args == [original.to_dict()] and request.kwargs == {}
    # Celery's log lines name the job and its request, never the prompt.
    assert request.argsrepr == f"[job {original.id} request {original.request_id}]"
    assert Job.from_dict(request.args[0]) == original
