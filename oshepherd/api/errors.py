"""The gateway's own errors, and the one place they become HTTP responses.

``ApiError`` carries an Ollama status and message. The response shape depends on the
surface: Ollama's ``{"error": "..."}`` on ``/api``, OpenAI's ``{"error": {...}}`` on ``/v1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

__all__ = [
    "ApiError",
    "error_body",
    "error_response",
    "install_handlers",
    "is_openai",
    "json_response",
]

JSON = "application/json; charset=utf-8"
OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


class ApiError(Exception):
    """An error the gateway answers itself, before any byte of a response has left."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, status: int, message: str) -> bytes:
    """The error object a client of ``path``'s surface expects."""
    if is_openai(path):
        kind = OPENAI_TYPES.get(status, "api_error")
        detail = {"message": message, "type": kind, "param": None, "code": None}
        return orjson.dumps({"error": detail})
    return orjson.dumps({"error": message})


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=JSON, headers=headers)


def error_response(path: str, exc: ApiError) -> Response:
    """``exc`` as the response a client of ``path``'s surface expects."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return _respond(path, exc.status, exc.message, headers)


def _respond(
    path: str, status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    body = error_body(path, status, message)
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return _respond(request.url.path, exc.status_code, message, exc.headers)


def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own parameter checks: a 400 like ours, not its 422 ``{"detail": [...]}``."""
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = next(iter(exc.errors()), {})
    where = ".".join(str(part) for part in first.get("loc", ())[1:])
    message = f"invalid value for '{where}': {first.get('msg', 'invalid')}"
    return _respond(request.url.path, 400, message)


def _unexpected_error(request: Request, exc: Exception) -> Response:
    # A bug, not bad input: still an error body the client's parser understands. Starlette
    # re-raises ``exc`` after sending this, so uvicorn logs the traceback.
    return _respond(request.url.path, 500, "internal error")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
