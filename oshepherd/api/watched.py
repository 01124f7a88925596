"""Responses that race their work against the client hanging up.

Starlette's ``StreamingResponse`` does the same; here every long answer (a relayed job, a
fleet's merged progress, a scattered embedding) needs it, so that a client that hangs up,
even while Ollama is silent, cancels its work at once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from oshepherd.api.errors import ApiError, error_line, error_response

__all__ = ["WatchedResponse", "until_disconnect"]

log = logging.getLogger(__name__)

T = TypeVar("T")
INTERNAL_ERROR = "internal error"


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client hangs up first.

    Then ``work`` is cancelled and ``ClientDisconnect`` raised. An exception ``work``
    raises propagates. ``work`` runs in the calling task; only the watch on ``receive`` is
    a task of its own, which cancels the caller when the client goes (a task less per
    request than running ``work`` beside it). Hazard: this consumes ``receive`` while
    ``work`` runs, so ``work`` must not read the request body.
    """
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        with contextlib.suppress(Exception):  # a receive that fails: the client is gone too
            while (await receive())["type"] != "http.disconnect":
                pass
        gone = True
        current.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and current.uncancel() == 0:  # our cancel, not the server's
            raise ClientDisconnect() from None
        raise
    finally:
        watcher.cancel()


class WatchedResponse(Response, abc.ABC):
    """A response written by ``respond`` while the client stays.

    ``close`` runs whatever happens, after ``respond`` was cancelled if the client hung up.
    An exception in ``respond`` is logged and ends the answer as well as it still can: an
    error status in the surface's shape if nothing was sent, else a last error line.
    """

    def __init__(self, path: str) -> None:
        self.background = None
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = _Sent(send)
        try:
            await until_disconnect(receive, self.respond(scope, receive, sent.send))
        except ClientDisconnect:
            log.info("%s: client went away", self)
        except Exception:
            log.exception("%s: the answer failed", self)
            await sent.abort(scope, receive, self.path)
        finally:
            await self.close()

    @abc.abstractmethod
    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the whole answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the work; cancel whatever did not finish."""


class _Sent:
    """How much of an answer has left, so that a failure can end it in its own format."""

    __slots__ = ("_send", "ended", "sse", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = self.ended = self.sse = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.sse = (
                dict(message.get("headers", ()))
                .get(b"content-type", b"")
                .startswith(b"text/event-stream")
            )
        elif not message.get("more_body", False):
            self.ended = True
        await self._send(message)

    async def abort(self, scope: Scope, receive: Receive, path: str) -> None:
        if not self.started:
            await error_response(path, ApiError(500, INTERNAL_ERROR))(scope, receive, self._send)
        elif not self.ended:
            body = error_line(path, INTERNAL_ERROR, sse=self.sse)
            await self._send({"type": "http.response.body", "body": body})
