"""Log lines of the API and the worker: the request each is about, as text or JSON.

The request id (``X-Request-Id``: the client's, when valid, or a fresh one) is set for the
request in a ``ContextVar`` (``request_id``): on the API by ``oshepherd.api.requestid`` for
the whole request, on the worker by the job runner while it runs the request's job
(``Job.request_id``). ``RequestIdFilter`` copies it onto every record the root handler
writes, so any module's line about a request names it without passing it along.

``LOG_FORMAT=text`` (the default) writes ``time LEVEL logger [request id]: message``; ``json``
writes one JSON object per line (python-json-logger): ``time``, ``level``, ``logger``,
``message``, ``request_id`` ("" outside a request), and ``exc_info`` with a traceback.
Python's warnings go the same way (logger ``py.warnings``).
"""

from __future__ import annotations

import logging
import secrets
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "LogFormat",
    "RequestIdFilter",
    "configure",
    "new_request_id",
    "request_id",
    "valid_request_id",
]

LogFormat = Literal["text", "json"]
MAX_REQUEST_ID = 128  # characters of a client's X-Request-Id kept; a longer one is replaced
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}
# Record attributes kept out of JSON lines: the text format's " [id]", uvicorn's copy of its
# message with terminal colour escapes.
JSON_SKIPPED = [*RESERVED_ATTRS, "request", "color_message"]

request_id: ContextVar[str] = ContextVar("oshepherd_request_id", default="")


def new_request_id() -> str:
    """A fresh request id: 32 random hex digits."""
    return secrets.token_hex(16)


def valid_request_id(value: bytes) -> str | None:
    """A client's ``X-Request-Id`` if it is 1 to ``MAX_REQUEST_ID`` printable ASCII
    characters (no spaces at either end), else None (the gateway makes its own)."""
    if not 0 < len(value) <= MAX_REQUEST_ID:
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() and text == text.strip() else None


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's id, or "") and ``request`` (" [id]", or
    "" outside a request, for the text format) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid
        record.request = f" [{rid}]" if rid else ""
        return True


def configure(level: str, log_format: LogFormat = "text") -> None:
    """Send the root logger's records at ``level`` and above to stderr in ``log_format``."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(JSON_FIELDS, rename_fields=JSON_NAMES, reserved_attrs=JSON_SKIPPED)
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python's warnings (Celery's as root...) as records too
    logging.getLogger("httpx").setLevel(logging.WARNING)
