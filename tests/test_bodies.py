"""Reading request bodies at the edge, in process: a client that hangs up while it sends
its body ends the request quietly, with no traceback and no answer anyone reads."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Message

from oshepherd.api.bodies import read_body
from oshepherd.api.errors import CLIENT_CLOSED, install_handlers

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


def app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        await read_body(request, 1 << 20)
        return Response("read")

    return app


async def test_a_client_that_hangs_up_mid_body_ends_the_request_quietly() -> None:
    incoming: list[Message] = [
        {"type": "http.request", "body": b'{"model": "ll', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/chat", "raw_path": b"/api/chat", "query_string": b"",
        "root_path": "", "headers": [(b"content-length", b"1000")], "server": ("t", 80),
    }  # fmt: skip
    await app()(scope, receive, send)  # raises if the disconnect reached the 500 handler
    assert sent[0]["status"] == CLIENT_CLOSED
