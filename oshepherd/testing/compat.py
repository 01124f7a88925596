"""Ollama's Anthropic and Responses layers, as the stand-in answers through them.

Ollama serves ``/v1/messages`` (``middleware/anthropic.go``, ``anthropic/anthropic.go``) and
``/v1/responses`` (``middleware/openai.go``, ``openai/responses.go``) by turning the request
into a chat and the chat's chunks into that API's objects or SSE events. The checks and
shapes here follow those sources for what the stand-in's chat produces: text tokens, and one
tool call when the request offers tools. Each check raises ``Invalid`` with Ollama's status
and message; the stand-in answers it in the route's error shape (``anthropic_error`` here).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

__all__ = [
    "AnthropicStream",
    "Invalid",
    "ResponsesStream",
    "anthropic_error",
    "anthropic_message",
    "check_messages_request",
    "check_responses_request",
    "response_message",
    "response_object",
    "tool_call",
]

Body = dict[str, Any]
Call = dict[str, Any]  # {"id", "name", "arguments"}: a tool call the model made
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}  # anthropic.NewError; anything else is an api_error
# The input items ResponsesInput's unmarshalling knows.
INPUT_ITEM_TYPES = (
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "web_search_call",
)


class Invalid(Exception):
    """A request the layer refuses before any chat runs."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _sse(event: str, data: Any) -> bytes:
    """One event as Ollama's ``writeSSE`` writes it."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def tool_call(tools: Any) -> Call | None:
    """The call the stand-in's model makes to the first Anthropic tool offered, if any, with
    the arguments ``{"x": 1}`` (as the stand-in's /api/chat), and an id like Ollama's."""
    if not (isinstance(tools, list) and tools and isinstance(tools[0], dict)):
        return None
    call_id = f"call_{secrets.token_hex(4)}"
    return {"id": call_id, "name": tools[0].get("name"), "arguments": {"x": 1}}


# Anthropic Messages ---------------------------------------------------------------------


def anthropic_error(status: int, message: str) -> Body:
    """``anthropic.NewError``: Anthropic's error object, typed by status."""
    kind = ANTHROPIC_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": _id("req")}


def check_messages_request(body: Body) -> None:
    """``AnthropicMessagesMiddleware``'s checks (after Go's JSON binding: wrong types are 400s)."""
    model, max_tokens, messages = body.get("model"), body.get("max_tokens"), body.get("messages")
    if model is not None and not isinstance(model, str):
        raise Invalid(400, "json: cannot unmarshal into Go struct field .model of type string")
    if not model:
        raise Invalid(400, "model is required")
    if max_tokens is not None and type(max_tokens) is not int:
        raise Invalid(400, "json: cannot unmarshal into Go struct field .max_tokens of type int")
    if not max_tokens or max_tokens <= 0:
        raise Invalid(400, "max_tokens is required and must be positive")
    if messages is not None and not isinstance(messages, list):
        raise Invalid(400, "json: cannot unmarshal into Go struct field .messages of type array")
    if not messages:
        raise Invalid(400, "messages is required")
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str | list):
            raise Invalid(400, "json: cannot unmarshal into Go value of type []ContentBlock")
        for block in content if isinstance(content, list) else ():
            if block.get("type") == "tool_use" and not block.get("id"):
                raise Invalid(400, "tool_use block missing required 'id' field")
    if not isinstance(body.get("stream", False), bool):
        raise Invalid(400, "json: cannot unmarshal into Go struct field .stream of type bool")


def _blocks(text: str, call: Call | None) -> list[Body]:
    blocks: list[Body] = [{"type": "text", "text": text}] if text else []
    if call:
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": call["name"], "input": call["arguments"]}
        )
    return blocks


def _stop_reason(call: Call | None) -> str:
    return "tool_use" if call else "end_turn"  # mapStopReason of done_reason "stop"


def anthropic_message(model: str, text: str, call: Call | None, usage: tuple[int, int]) -> Body:
    """``anthropic.ToMessagesResponse``: the whole answer as one message object."""
    return {
        "id": _id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _blocks(text, call),
        "stop_reason": _stop_reason(call),
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }


class AnthropicStream:
    """``anthropic.StreamConverter``: the chat's chunks as Anthropic's SSE events.

    ``message_start`` with the first write; a text block (``content_block_start``, a
    ``text_delta`` per chunk, ``content_block_stop``); a tool_use block whose input comes
    whole in one ``input_json_delta``; ``message_delta`` with the stop reason and usage;
    ``message_stop``.
    """

    def __init__(self, model: str, input_tokens: int) -> None:
        self.model, self.input_tokens = model, input_tokens
        self.index, self.begun, self.text_open, self.called = 0, False, False, False

    def _start(self) -> bytes:
        if self.begun:
            return b""
        self.begun = True
        message = {
            "id": _id("msg"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return _sse("message_start", {"type": "message_start", "message": message})

    def chunk(self, text: str, call: Call | None = None) -> bytes:
        out = self._start()
        if text:
            if not self.text_open:
                self.text_open = True
                text_block = {"type": "text", "text": ""}
                out += self._event("content_block_start", content_block=text_block)
            delta = {"type": "text_delta", "text": text}
            out += self._event("content_block_delta", delta=delta)
        if call:
            out += self._close_text()
            block = {"type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}
            delta = {
                "type": "input_json_delta",
                "partial_json": orjson.dumps(call["arguments"]).decode(),
            }
            out += self._event("content_block_start", content_block=block)
            out += self._event("content_block_delta", delta=delta)
            out += self._event("content_block_stop")
            self.index += 1
            self.called = True
        return out

    def done(self, output_tokens: int) -> bytes:
        out = self._start() + self._close_text()
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use" if self.called else "end_turn"},
            "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens},
        }
        return out + _sse("message_delta", delta) + _sse("message_stop", {"type": "message_stop"})

    def _close_text(self) -> bytes:
        if not self.text_open:
            return b""
        out = self._event("content_block_stop")
        self.index += 1
        self.text_open = False
        return out

    def _event(self, kind: str, **fields: Any) -> bytes:
        return _sse(kind, {"type": kind, "index": self.index, **fields})


# OpenAI Responses -----------------------------------------------------------------------


def check_responses_request(body: Body) -> None:
    """``ResponsesMiddleware``'s binding of ``input`` and ``stream`` (the model is /api/chat's)."""
    value = body.get("input")
    if value is not None and not isinstance(value, str):
        if not isinstance(value, list):
            raise Invalid(400, "input must be a string or array")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise Invalid(400, f"input[{i}]: json: cannot unmarshal into Go value")
            kind = item.get("type") or ("message" if item.get("role") else "")
            if kind not in INPUT_ITEM_TYPES:
                missing = "input item missing required 'type' field"
                raise Invalid(
                    400,
                    f"input[{i}]: {missing if not kind else f'unknown input item type: {kind!r}'}",
                )
    if not isinstance(body.get("stream", False), bool | None):
        raise Invalid(400, "json: cannot unmarshal into Go struct field .stream of type bool")


def _message_item(item_id: str, text: str, status: str) -> Body:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    content = [part] if status == "completed" else []
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def response_object(
    request: Body, response_id: str, status: str, output: list[Body], usage: tuple[int, int] | None
) -> Body:
    """``openai.ToResponse`` (and the stream's ``buildResponseObject``): a response object
    echoing the request's settings."""
    tokens = None
    if usage:
        tokens = {
            "input_tokens": usage[0],
            "output_tokens": usage[1],
            "total_tokens": sum(usage),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
    done = status == "completed"
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "completed_at": int(time.time()) if done else None,
        "status": status,
        "incomplete_details": None,
        "model": request.get("model"),
        "previous_response_id": None,
        "instructions": request.get("instructions") or None,
        "output": output,
        "error": None,
        "tools": request.get("tools") or [],
        "tool_choice": "auto",
        "truncation": request.get("truncation") or "disabled",
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "top_p": request.get("top_p", 1.0),
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": request.get("temperature", 1.0),
        "reasoning": None,
        "usage": tokens,
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": None,
        "store": False,
        "background": bool(request.get("background")),
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


def response_message(request: Body, text: str, usage: tuple[int, int]) -> Body:
    """The whole answer as one response object with one message item."""
    response_id = f"resp_{secrets.randbelow(999999)}"
    item = _message_item(f"msg_{secrets.randbelow(999999)}", text, "completed")
    return response_object(request, response_id, "completed", [item], usage)


class ResponsesStream:
    """``openai.ResponsesStreamConverter`` for text: ``response.created`` and
    ``response.in_progress`` with the first write, ``response.output_item.added`` and
    ``response.content_part.added`` with the first text,
    a ``response.output_text.delta`` per chunk, then ``response.output_text.done``,
    ``response.content_part.done``, ``response.output_item.done`` and
    ``response.completed``; every event's data carries its ``sequence_number``."""

    def __init__(self, request: Body) -> None:
        self.request = request
        self.response_id = f"resp_{secrets.randbelow(999999)}"
        self.item_id = f"msg_{secrets.randbelow(999999)}"
        self.sequence, self.text, self.begun, self.started = 0, "", False, False

    def _start(self) -> bytes:
        if self.begun:
            return b""
        self.begun = True
        response = response_object(self.request, self.response_id, "in_progress", [], None)
        created = self._event("response.created", response=response)
        return created + self._event("response.in_progress", response=response)

    def chunk(self, text: str) -> bytes:
        out = self._start()
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        if not self.started:
            self.started = True
            item = _message_item(self.item_id, "", "in_progress")
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event("response.output_item.added", output_index=0, item=item)
            out += self._event("response.content_part.added", **where, part=part)
        self.text += text
        return out + self._event("response.output_text.delta", **where, delta=text, logprobs=[])

    def done(self, usage: tuple[int, int]) -> bytes:
        item = _message_item(self.item_id, self.text, "completed")
        out = self._start()
        if self.started:
            where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
            out += self._event("response.output_text.done", **where, text=self.text, logprobs=[])
            out += self._event("response.content_part.done", **where, part=item["content"][0])
            out += self._event("response.output_item.done", output_index=0, item=item)
        output = [item] if self.started else []
        response = response_object(self.request, self.response_id, "completed", output, usage)
        return out + self._event("response.completed", response=response)

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {**fields, "type": kind, "sequence_number": self.sequence}
        self.sequence += 1
        return _sse(kind, data)
