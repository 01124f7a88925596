"""Scatter-gather embeddings: a long ``input`` list embedded in batches across the fleet.

An ``/api/embed`` or ``/v1/embeddings`` request with more inputs than ``embed_batch_size``
becomes one job per batch on the model's queue. The workers holding the model pull them
concurrently (the pull model spreads them), and the answers are put back together in input
order, in the surface's own shape. A request of one batch or less never comes here: it
goes to Ollama untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from oshepherd.api.dispatcher import Dispatcher
from oshepherd.api.errors import CLIENT_CLOSED, JSON, JobFailed, json_response
from oshepherd.api.gateway import gateway
from oshepherd.api.jobstream import JobStream
from oshepherd.api.watched import until_disconnect
from oshepherd.connections import raise_if_cancelling
from oshepherd.models import normalize
from oshepherd.protocol import End

__all__ = ["Reply", "applies", "collect", "scatter"]

log = logging.getLogger(__name__)

Part = dict[str, Any]


@dataclass(slots=True)
class Reply:
    """A job's complete answer, as Ollama wrote it."""

    status: int
    content_type: str
    body: bytes

    def response(self) -> Response:
        """The answer relayed as it is: status, content type and bytes."""
        return Response(self.body, status_code=self.status, media_type=self.content_type)


class BatchFailed(Exception):
    """Ollama refused a batch: its answer becomes the whole request's answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"batch failed with status {reply.status}")
        self.reply = reply


async def collect(stream: JobStream) -> Reply:
    """A job's whole answer: a head marked ``last``, or a head, data frames and the end.

    Raises ``ApiError`` when the job fails, before its head or after it.
    """
    head = await stream.head()
    chunks = [head.body]
    if not head.last:
        while not isinstance(frame := await stream.next(), End):
            chunks.append(frame.body)
        chunks.append(frame.body)
    return Reply(head.status, head.content_type or JSON, b"".join(chunks))


def _merge_ollama(parts: list[Part], took_ns: int) -> Part:
    """``/api/embed``: embeddings concatenated, ``prompt_eval_count`` summed.

    ``total_duration`` is the gateway's wall time of the whole scatter: the batches ran
    concurrently, so their sum would overstate what the client waited, and their maximum
    would hide the time batches spent queued behind each other. ``load_duration`` is the
    longest load: hosts load the model in parallel and the slowest one held the request up.
    """
    return {
        **parts[0],
        "embeddings": [vector for part in parts for vector in part.get("embeddings") or []],
        "total_duration": took_ns,
        "load_duration": max(int(part.get("load_duration") or 0) for part in parts),
        "prompt_eval_count": sum(int(part.get("prompt_eval_count") or 0) for part in parts),
    }


def _merge_openai(parts: list[Part], took_ns: int) -> Part:
    """``/v1/embeddings``: the data items in input order, re-indexed; usage summed."""
    items = [item for part in parts for item in part.get("data") or []]
    usage = {
        key: sum(int((part.get("usage") or {}).get(key) or 0) for part in parts)
        for key in ("prompt_tokens", "total_tokens")
    }
    return {
        **parts[0],
        "data": [{**item, "index": i} for i, item in enumerate(items)],
        "usage": usage,
    }


MERGERS: dict[str, Callable[[list[Part], int], Part]] = {
    "/api/embed": _merge_ollama,
    "/v1/embeddings": _merge_openai,
}


def applies(path: str, data: dict[str, Any], batch_size: int) -> bool:
    """Whether ``data`` is an embedding request with more inputs than one batch."""
    inputs = data.get("input")
    return path in MERGERS and isinstance(inputs, list) and len(inputs) > batch_size


async def scatter(request: Request, path: str, data: dict[str, Any], model: str) -> Response:
    """Embed ``data["input"]`` in batches over the fleet and answer as one Ollama would.

    The first batch to fail decides the answer (Ollama's own error body, or the gateway's
    ``ApiError``) and the other batches are cancelled, as all are when the client hangs up.
    """
    gw = gateway(request)
    size = gw.settings.embed_batch_size
    inputs: list[Any] = data["input"]
    bodies = [
        orjson.dumps({**data, "input": inputs[i : i + size]}).decode()
        for i in range(0, len(inputs), size)
    ]
    # At most as many batches in flight as the holders have slots: the rest of the fleet's
    # clients keep their place in the queue, and no batch waits out its queue deadline.
    slots = sum(w.slots for w in gw.registry.healthy_holders(normalize(model)))
    started = time.perf_counter_ns()
    gathering = _gather(gw.dispatcher, path, bodies, model, asyncio.Semaphore(max(1, slots)))
    try:
        parts = await until_disconnect(request.receive, gathering)
    except ClientDisconnect:
        log.info("embed scatter of %d batches for %s: client went away", len(bodies), model)
        return Response(status_code=CLIENT_CLOSED)
    except BatchFailed as failed:
        return failed.reply.response()
    return json_response(MERGERS[path](parts, time.perf_counter_ns() - started))


async def _gather(
    dispatcher: Dispatcher, path: str, bodies: list[str], model: str, window: asyncio.Semaphore
) -> list[Part]:
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_batch(dispatcher, path, b, model, window)) for b in bodies]
    except ExceptionGroup as failed:
        # The group has cancelled the other batches; the first failure is the answer.
        raise failed.exceptions[0] from failed
    return [task.result() for task in tasks]


async def _batch(
    dispatcher: Dispatcher, path: str, body: str, model: str, window: asyncio.Semaphore
) -> Part:
    async with window:
        stream = await dispatcher.submit("POST", path, body, model)
        try:
            raise_if_cancelling()  # a batch the group has cancelled must not wait on
            reply = await collect(stream)
        finally:
            await stream.close()
    if reply.status != 200:
        raise BatchFailed(reply)
    try:
        part = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        part = None
    if not isinstance(part, dict):
        raise JobFailed(502, f"job {stream.job.id}: the worker's answer is not a JSON object")
    return part
