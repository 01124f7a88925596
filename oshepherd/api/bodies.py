"""Reading request bodies, bounded and checked where we read: JSON whatever the Content-Type,
or a multipart form (an upload, carried on as its exact bytes)."""

from __future__ import annotations

import sys
from typing import Any

import orjson
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from oshepherd.api.errors import BadRequest, ContentTooLarge

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

__all__ = ["Body", "Form", "model_name", "read_body", "read_form", "stream_flag"]

MAX_MODEL_NAME = 512


class Body:
    """A client's JSON object, and its exact text (forwarded to Ollama unchanged, decompressed
    if it came zstd-encoded)."""

    __slots__ = ("data", "text")

    def __init__(self, text: str, data: dict[str, Any]) -> None:
        self.text = text
        self.data = data


async def read_body(request: Request, limit: int) -> Body:
    """The request's JSON object, at most ``limit`` bytes as sent and as decoded.

    ``Content-Encoding: zstd`` is undone first: Codex compresses its Responses requests, and
    Ollama's /v1/responses accepts them (middleware/openai.go). Raises ``ContentTooLarge``
    and ``BadRequest``.
    """
    raw = await _read_bounded(request, limit)
    if request.headers.get("content-encoding", "").strip().lower() == "zstd":
        raw = _unzstd(raw, limit)
    if not raw.strip():
        raise BadRequest("missing request body")
    try:
        text = raw.decode()
        data = orjson.loads(text)
    except UnicodeDecodeError:
        raise BadRequest("invalid request body: not valid UTF-8") from None
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("invalid request body: expected a JSON object")
    return Body(text, data)


class Form:
    """A client's multipart/form-data body: its exact bytes and ``content_type`` (with the
    boundary), forwarded to Ollama unchanged, and its text ``fields`` (the first value of
    each name; file parts are not copied)."""

    __slots__ = ("content_type", "fields", "raw")

    def __init__(self, raw: bytes, content_type: str, fields: dict[str, Any]) -> None:
        self.raw = raw
        self.content_type = content_type
        self.fields = fields


async def read_form(request: Request, limit: int) -> Form:
    """The request's multipart form, read whole (at most ``limit`` bytes).

    Raises ``ContentTooLarge``, and ``BadRequest`` when the body is not a complete
    multipart/form-data message (as Go's ``ParseMultipartForm`` refuses it for Ollama).
    """
    content_type = request.headers.get("content-type", "")
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise BadRequest(
            "failed to parse multipart form: request Content-Type isn't multipart/form-data"
        )
    raw = await _read_bounded(request, limit)
    return Form(raw, content_type, _FormFields(boundary).parse(raw))


class _FormFields:
    """The text fields of a multipart body, parsed by python-multipart's streaming parser."""

    def __init__(self, boundary: bytes) -> None:
        self._boundary = boundary
        self.fields: dict[str, Any] = {}
        self._header = b""
        self._name: str | None = None  # of the text field being read; None in a file part
        self._value = bytearray()
        self._ended = False

    def parse(self, raw: bytes) -> dict[str, Any]:
        try:  # the parser refuses some boundaries (over 256 bytes) when it is made
            parser = MultipartParser(
                self._boundary,
                {
                    "on_part_begin": self._begin,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value,
                    "on_part_data": self._data,
                    "on_part_end": self._end_part,
                    "on_end": self._end,
                },
            )
            parser.write(raw)
        except FormParserError as exc:
            raise BadRequest(f"failed to parse multipart form: {exc}") from None
        if not self._ended:
            raise BadRequest("failed to parse multipart form: unexpected end of body")
        return self.fields

    def _begin(self) -> None:
        self._name, self._value = None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header = data[start:end].lower()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        if self._header == b"content-disposition":
            _, params = parse_options_header(data[start:end])
            name = params.get(b"name")
            text_field = name is not None and b"filename" not in params
            self._name = name.decode(errors="replace") if text_field and name else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name is not None:
            self._value += data[start:end]

    def _end_part(self) -> None:
        if self._name is not None:
            self.fields.setdefault(self._name, self._value.decode(errors="replace"))

    def _end(self) -> None:
        self._ended = True


def _unzstd(data: bytes, limit: int) -> bytes:
    """``data``'s zstd frames decompressed, never past ``limit`` bytes."""
    out = bytearray()
    while data:
        frame = zstd.ZstdDecompressor()
        try:
            out += frame.decompress(data, max_length=limit + 1 - len(out))
        except zstd.ZstdError as exc:
            raise BadRequest(f"failed to decompress zstd body: {exc}") from None
        if len(out) > limit:
            raise ContentTooLarge(limit)
        if not frame.eof:
            raise BadRequest("failed to decompress zstd body: truncated")
        data = frame.unused_data
    return bytes(out)


async def _read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ContentTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ContentTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def model_name(data: dict[str, Any], *fields: str) -> str:
    """The model a request names (first of ``fields`` present), checked like Ollama does."""
    value = next((data[f] for f in fields if data.get(f) is not None), None)
    if value is None or value == "":
        raise BadRequest("model is required")
    if not isinstance(value, str):
        raise BadRequest(f"invalid model name: expected a string, got {type(value).__name__}")
    if len(value) > MAX_MODEL_NAME or not value.isprintable() or value != value.strip():
        raise BadRequest("invalid model name")
    return value


def stream_flag(data: dict[str, Any], default: bool) -> bool:
    value = data.get("stream")
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(
            f"invalid value for 'stream': expected a boolean, got {type(value).__name__}"
        )
    return value
