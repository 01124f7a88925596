"""``X-Request-Id`` on every answer: the client's, when valid, or a fresh one.

``RequestId`` is the outermost ASGI middleware but for the metrics, so every response
carries the header, the errors of the guards, of ``Authenticate`` (401, 403, 429) and of
the routes included. It sets ``oshepherd.logs.request_id`` for the request: the API's log
lines name it, and the dispatcher puts it in each job (``Job.request_id``), so the worker's
lines about the job name it too. A client's id is kept when ``valid_request_id`` accepts it
(1 to 128 printable ASCII characters), else replaced by a fresh one (32 hex digits).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oshepherd.logs import new_request_id, request_id, valid_request_id

__all__ = ["HEADER", "RequestId"]

HEADER = b"x-request-id"


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == HEADER:
                rid = valid_request_id(value)
                break
        rid = rid or new_request_id()
        header = (HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
