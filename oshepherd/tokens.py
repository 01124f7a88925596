"""Tokens counted from Ollama's answers, on the worker, without re-encoding a byte relayed.

Where each surface puts its counts (Ollama's source):

=========================================  ===================================================
``/api/generate``, ``/api/chat``            the final chunk's ``api.Metrics``:
                                            ``prompt_eval_count``, ``eval_count``,
                                            ``eval_duration`` (ns), streamed or not
``/api/embed``                              ``prompt_eval_count`` (``api.EmbedResponse``)
``/v1/chat/completions``,                   ``usage.prompt_tokens`` / ``completion_tokens``
``/v1/completions``, ``/v1/embeddings``     (``openai/openai.go``): in the body, or in a
                                            stream's usage chunk with
                                            ``stream_options.include_usage``
``/v1/messages``                            ``usage.input_tokens`` / ``output_tokens``
                                            (``anthropic/anthropic.go``): the body, or the
                                            ``message_delta`` event (cumulative)
``/v1/responses``                           ``usage.input_tokens`` / ``output_tokens``
                                            (``openai/responses.go``): the body, or
                                            ``response.completed``
``/api/embeddings``, transcriptions         none: 0
=========================================  ===================================================

``TokenMeter`` scans each chunk as it passes for those keys and keeps the last value of
each (the final chunk's come last: Go writes a struct's fields in order and ``Metrics`` /
``usage`` after the content). A key only matches structurally: inside a JSON string its
quotes are escaped. It keeps a few bytes of carry between chunks, nothing else.

An OpenAI stream without ``stream_options.include_usage`` carries no usage: ``UsageProbe``
asks Ollama for it (appending the option to the request's JSON text) and removes what that
adds to the answer, so the client's bytes are what Ollama would have sent it: the usage
chunk (the one event whose ``choices`` is empty) and, on ``/v1/completions``, the zero
``usage`` Ollama then writes into every chunk (``middleware/openai.go``, CompleteWriter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

__all__ = ["NO_COUNTS", "PROBED_PATHS", "Counts", "TokenMeter", "UsageProbe"]


@dataclass(frozen=True, slots=True)
class Counts:
    """Tokens of one answer (0 when Ollama gave none); ``eval_duration`` in nanoseconds."""

    prompt: int = 0
    completion: int = 0
    eval_duration: int = 0


NO_COUNTS = Counts()
_NATIVE = ("prompt_eval_count", "eval_count", "eval_duration")
_OPENAI = ("prompt_tokens", "completion_tokens", "")
_ANTHROPIC = ("input_tokens", "output_tokens", "")
# Per path: the names of the prompt count, the completion count and the duration ("": none).
SURFACES: dict[str, tuple[str, str, str]] = {
    "/api/generate": _NATIVE,
    "/api/chat": _NATIVE,
    "/api/embed": _NATIVE,
    "/v1/chat/completions": _OPENAI,
    "/v1/completions": _OPENAI,
    "/v1/embeddings": _OPENAI,
    "/v1/messages": _ANTHROPIC,
    "/v1/responses": _ANTHROPIC,
}
# Longest key with its quotes and colon, and an int64's digits: a match cut by a chunk
# boundary is whole in the carry plus the next chunk.
CARRY = 48
_PATTERNS = {
    names: re.compile(rb'"(' + b"|".join(n.encode() for n in names if n) + rb')":(\d+)')
    for names in set(SURFACES.values())
}


class TokenMeter:
    """Reads the counts of one answer on ``path`` from its chunks as they pass."""

    __slots__ = ("_carry", "_names", "_pattern", "_seen")

    def __init__(self, names: tuple[str, str, str]) -> None:
        self._names = names
        self._pattern = _PATTERNS[names]
        self._carry = b""
        self._seen: dict[bytes, int] = {}

    @classmethod
    def for_path(cls, path: str) -> TokenMeter | None:
        """A meter for an answer on ``path`` (Ollama's path), None where none is counted."""
        names = SURFACES.get(path)
        return cls(names) if names is not None else None

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk if self._carry else chunk
        for match in self._pattern.finditer(data):
            self._seen[match.group(1)] = int(match.group(2))
        self._carry = data[-CARRY:]

    def counts(self) -> Counts:
        prompt, completion, duration = (self._seen.get(n.encode(), 0) for n in self._names)
        return Counts(prompt, completion, duration)


PROBED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}'
_ZERO_USAGE = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
_USAGE_CHUNK = b'"choices":[]'
_EVENT_END = b"\n\n"


class UsageProbe:
    """Asks Ollama for the usage of an OpenAI stream the client did not ask it for, and
    takes out of the answer what that adds (see the module's docstring)."""

    __slots__ = ("_pending", "body")

    def __init__(self, body: bytes) -> None:
        self.body = body  # the request to send Ollama instead
        self._pending = b""

    @classmethod
    def for_request(cls, path: str, body: bytes) -> UsageProbe | None:
        """A probe when ``body`` on ``path`` asks for a stream without usage, else None.

        The option is appended as the object's last key: Go's decoder lets a later key
        win, and decodes it into the ``stream_options`` the client may have sent.
        """
        if path not in PROBED_PATHS:
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("stream") is not True:
            return None
        options = data.get("stream_options")
        if options is not None and not isinstance(options, dict):
            return None  # Ollama's own 400, untouched
        if options and options.get("include_usage") is True:
            return None
        text = body.rstrip()
        return cls(text[:-1] + _INCLUDE_USAGE + b"}")

    def filter(self, chunk: bytes) -> bytes:
        """The complete events of what Ollama wrote so far, as the client's request would
        have had them; a partial last event waits for the next chunk."""
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(_EVENT_END)
        if cut < 0:
            self._pending = data
            return b""
        cut += len(_EVENT_END)
        self._pending = data[cut:]
        return _restore(data[:cut])

    def rest(self) -> bytes:
        """What is left once Ollama's answer ended (nothing, from a whole stream)."""
        rest, self._pending = self._pending, b""
        return _restore(rest)


def _restore(events: bytes) -> bytes:
    at = events.find(_USAGE_CHUNK)
    if at >= 0:
        start = events.rfind(_EVENT_END, 0, at)
        start = 0 if start < 0 else start + len(_EVENT_END)
        end = events.find(_EVENT_END, at)
        end = len(events) if end < 0 else end + len(_EVENT_END)
        events = events[:start] + events[end:]
    if _ZERO_USAGE in events:
        events = events.replace(_ZERO_USAGE, b"")
    return events
