"""The gateway's own errors, and the one place they become HTTP responses.

Every error the API answers itself is an ``ApiError``, raised anywhere and translated at
the edge (``install_handlers``, or a response that has already begun) into the shape of
the route's surface: Ollama's ``{"error": "..."}`` on ``/api``, Anthropic's
``{"type": "error", "error": {"type", "message"}}`` on ``/v1/messages``, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` on the rest of ``/v1``. An error with a
machine-readable ``code`` (``invalid_api_key``...) carries it beside ``error`` on ``/api``,
in ``error.code`` on OpenAI's surface and beside ``type`` and ``message`` on Anthropic's.
Redis errors are translated where they enter (``RedisUnavailable``); a worker's failure
arrives as an ``Error`` frame and leaves as ``JobFailed``.

The tree, with each class's HTTP status (and ``Retry-After`` seconds)::

    ApiError                  any status, any message
    ├── BadRequest            400  the request itself is wrong
    ├── Unauthorized          401  no API key, or one the gateway does not know
    ├── Forbidden             403  the key (or the client's address) may not do this
    ├── TooManyRequests       429 (Retry-After)  past one of the key's limits
    ├── ContentTooLarge       413  the body is over MAX_BODY_BYTES
    ├── ModelNotFound         404  no live worker's host has the model
    ├── JobFailed             the worker's status (502: its Ollama went away, ...)
    └── Unavailable           503 (5 s)  try again later
        ├── RedisUnavailable  the gateway cannot reach Redis
        ├── NoHealthyWorker   the hosts that have the model (or any) do not answer
        ├── QueueFull         the model's queue is at its maximum depth
        └── QueueTimeout      no worker took the job before its deadline
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from oshepherd.api.metrics import note_redis_error

__all__ = [
    "CLIENT_CLOSED",
    "JSON",
    "ApiError",
    "BadRequest",
    "ContentTooLarge",
    "Forbidden",
    "JobFailed",
    "ModelNotFound",
    "NoHealthyWorker",
    "QueueFull",
    "QueueTimeout",
    "RedisUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "error_body",
    "error_line",
    "error_response",
    "install_handlers",
    "is_anthropic",
    "is_openai",
    "json_response",
]

JSON = "application/json; charset=utf-8"
OPENAI_TYPES = {
    400: "invalid_request_error",
    # OpenAI's own 401 (code "invalid_api_key") and 403 are invalid_request_errors.
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Anthropic's error types by status (its API's "HTTP errors"; 503 as Ollama's
# anthropic.NewError maps it); any other 4xx is an invalid_request_error, 5xx an api_error.
ANTHROPIC_TYPES = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# nginx's status for "the client closed the request before the answer": nobody reads it.
CLIENT_CLOSED = 499
RETRY_AFTER = 5  # seconds, for every 503 the gateway answers itself


class ApiError(Exception):
    """An error the gateway answers itself: an HTTP ``status``, a ``message``, the
    ``Retry-After`` seconds to send, if any, and a machine-readable ``code``, if any."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.code = code


class BadRequest(ApiError):
    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(400, message, code=code)


class Unauthorized(ApiError):
    """401: a key is needed and none, or none the gateway knows, was given."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(401, message, code=code)


class Forbidden(ApiError):
    """403: the key's scope or models, or the client's address, do not allow the request."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(403, message, code=code)


class TooManyRequests(ApiError):
    """429: past one of the key's limits (``oshepherd.api.limits``); ``code`` says which:
    ``rate_limited``, ``concurrency_limited`` or ``token_budget_exhausted``. ``retry``
    False adds ``x-should-retry: false``, which the OpenAI and Anthropic SDKs obey (the
    Anthropic SDK otherwise sleeps for any ``Retry-After``, hours to the next UTC day)."""

    def __init__(self, message: str, *, code: str, retry_after: int, retry: bool = True) -> None:
        super().__init__(429, message, retry_after=retry_after, code=code)
        self.retry = retry


class ContentTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class ModelNotFound(ApiError):
    def __init__(self, model: str) -> None:
        super().__init__(404, f"model '{model}' not found")


class JobFailed(ApiError):
    """A worker reported the job failed before any byte of the answer left.

    ``retry``: the job never reached Ollama, so another worker may run it.
    """

    def __init__(self, status: int, message: str, *, retry: bool = False) -> None:
        super().__init__(status, message)
        self.retry = retry


class Unavailable(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message, retry_after=RETRY_AFTER)


class RedisUnavailable(Unavailable):
    """Counted, where it is made, in ``oshepherd_redis_errors_total``."""

    def __init__(self, detail: object = None) -> None:
        note_redis_error()
        suffix = f": {detail}" if detail else ""
        super().__init__(f"the gateway cannot reach Redis{suffix}")


class NoHealthyWorker(Unavailable):
    def __init__(self, model: str | None = None) -> None:
        has = f" has model '{model}'" if model else " is available"
        super().__init__(f"no healthy worker{has}")


class QueueFull(Unavailable):
    def __init__(self) -> None:
        # Ollama's own words (server/sched.go's ErrMaxQueue), which clients may match.
        super().__init__("server busy, please try again.  maximum pending requests exceeded")


class QueueTimeout(Unavailable):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"no worker could take the job within {timeout:g}s")


def is_openai(path: str) -> bool:
    """Whether ``path`` is on OpenAI's surface (``/v1``, except Anthropic's routes)."""
    return (path.startswith("/v1/") or path == "/v1") and not is_anthropic(path)


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is on Anthropic's surface (``/v1/messages`` and below)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, status: int, message: str, code: str | None = None) -> bytes:
    """The error object a client of ``path``'s surface expects, as JSON bytes; ``code``,
    when given, is added where that surface keeps a machine-readable code."""
    if is_anthropic(path):
        fallback = "invalid_request_error" if 400 <= status < 500 else "api_error"
        error = {"type": ANTHROPIC_TYPES.get(status, fallback), "message": message}
        if code is not None:
            error["code"] = code
        return orjson.dumps({"type": "error", "error": error})
    if is_openai(path):
        kind = OPENAI_TYPES.get(status, "api_error")
        detail = {"message": message, "type": kind, "param": None, "code": code}
        return orjson.dumps({"error": detail})
    if code is not None:
        return orjson.dumps({"error": message, "code": code})
    return orjson.dumps({"error": message})


def error_line(path: str, message: str, *, sse: bool) -> bytes:
    """A failure after the answer began: one last NDJSON line, or SSE event, that ends it
    (Anthropic's streams name theirs ``event: error``, as its API does)."""
    body = error_body(path, 500, message)
    if not sse:
        return body + b"\n"
    return (b"event: error\ndata: " if is_anthropic(path) else b"data: ") + body + b"\n\n"


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=JSON, headers=headers)


def error_response(path: str, exc: ApiError) -> Response:
    """``exc`` as the response a client of ``path``'s surface expects."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    if isinstance(exc, TooManyRequests) and not exc.retry:
        headers["x-should-retry"] = "false"
    return _respond(path, exc.status, exc.message, headers, exc.code)


def _respond(
    path: str,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    code: str | None = None,
) -> Response:
    body = error_body(path, status, message, code)
    return Response(body, status_code=status, media_type=JSON, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request.scope["path"], exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return _respond(request.scope["path"], exc.status_code, message, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own parameter checks: a 400 like ours, not its 422 ``{"detail": [...]}``."""
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = next(iter(exc.errors()), {})
    where = ".".join(str(part) for part in first.get("loc", ())[1:])
    message = f"invalid value for '{where}': {first.get('msg', 'invalid')}"
    return _respond(request.scope["path"], 400, message)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # A bug, not bad input: still an error body the client's parser understands. Starlette
    # re-raises ``exc`` after sending this, so uvicorn logs the traceback.
    return _respond(request.scope["path"], 500, "internal error")


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client hung up while sending its body: nobody reads this answer, and it is no bug.
    return Response(status_code=CLIENT_CLOSED)


def install_handlers(app: FastAPI) -> None:
    """The gateway's error answers (coroutines: Starlette runs a plain function handler in
    its thread pool, a thread hop for every 4xx and 5xx)."""
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
