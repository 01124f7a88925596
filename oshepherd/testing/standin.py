"""An Ollama stand-in: a test double of one Ollama host, for the tests and the benchmarks.

It follows Ollama's own routes (``server/routes.go``: the native API and the OpenAI-compatible
layer) closely enough that ollama-python works against it, has knobs for latency, token pacing
and concurrency, injects faults, and counts what reached it. Ollama itself cannot run where
the tests do; everything else they use is real. ``StandIn`` serves one on a thread of this
process; ``python -m oshepherd.testing.standin --help`` serves one as a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import itertools
import math
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import nullcontext, suppress
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import orjson
import uvicorn
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from oshepherd import durations
from oshepherd.models import normalize
from oshepherd.stack import wait_until
from oshepherd.testing import compat

JSON = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
FORM_PATH = "/v1/audio/transcriptions"  # the one route whose body is a multipart form
SIZE = 4_661_224_676
FOREVER = (1 << 63) / 1e9  # seconds: the longest Go time.Duration
BLOB_DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")  # manifest.BlobsPath's check
DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "8B",
    "quantization_level": "Q4_0",
}
Body = dict[str, Any]
Handler = Callable[[Request, Body], Any]
# When the model the current request needs has loaded (monotonic s; 0: it was loaded), set
# by ``StandIn._admit`` for the ``_Reply`` of the request (each runs in a context of its own).
_READY: ContextVar[float] = ContextVar("standin_ready", default=0.0)


class _Fail(Exception):
    """An error answered before the first byte."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _full(name: str) -> str:
    """`name` with its tag (`:latest` when the last path segment has none)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _key(name: str) -> str:
    """The name Ollama matches ``name`` by: ``ParseName`` then ``DisplayShortest``, case
    folded (``library/llama3`` is ``llama3:latest``), as ``oshepherd.models.normalize``."""
    return normalize(name)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Fail(400, "model is required")
    return value


def _expiry(keep_alive: Any) -> datetime:
    """When a model loaded with `keep_alive` unloads (Ollama's default: 5 minutes; a negative
    one: never, which Go's time.Duration caps near 292 years). Invalid: Ollama's 400."""
    try:
        seconds = durations.seconds(300 if keep_alive is None else keep_alive)
    except ValueError as exc:
        raise _Fail(400, str(exc)) from None
    return datetime.now(UTC) + timedelta(seconds=min(seconds, FOREVER))


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _embedding(text: str, dim: int) -> list[float]:
    """A unit vector derived from `text` alone, so batching cannot change it."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dim)
    vec = [int.from_bytes(raw[i : i + 2], "big") / 32767.5 - 1.0 for i in range(0, 2 * dim, 2)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _inputs(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if raw is not None and not (isinstance(raw, list) and all(isinstance(x, str) for x in raw)):
        raise _Fail(400, "invalid input type")
    return list(raw or [])


def _words(body: Body) -> int:
    """Prompt size in 'tokens': words of the prompt and message contents, at least 1."""
    messages = body.get("messages")
    parts = [str(body.get("prompt") or "")]
    if isinstance(messages, list):
        parts += [str(m.get("content") or "") for m in messages if isinstance(m, dict)]
    return max(1, len(" ".join(parts).split()))


def _check(check: Callable[[Body], None], body: Body) -> None:
    """A compatibility layer's check of ``body``, failing as the stand-in fails."""
    try:
        check(body)
    except compat.Invalid as exc:
        raise _Fail(exc.status, exc.message) from None


def _line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _error(path: str, status: int, message: str) -> Any:
    """Ollama's error body, Anthropic's on /v1/messages, or OpenAI's under /v1."""
    if not path.startswith("/v1"):
        return {"error": message}
    if path.startswith("/v1/messages"):
        return compat.anthropic_error(status, message)
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, media_type=JSON)


def _decode(raw: bytes) -> Body:
    """Parse a request body as a JSON object, whatever its Content-Type."""
    if not raw.strip():
        raise _Fail(400, "missing request body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Fail(400, f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _Fail(400, "request body must be a JSON object")
    return body


async def _until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


async def _once(make: Callable[[], bytes]) -> AsyncGenerator[bytes, None]:
    yield make()


class _Reply:
    """ASGI response for model work: waits for a slot and `latency`, sends headers with the
    first chunk, and stops producing as soon as the caller hangs up."""

    def __init__(
        self, host: StandIn, chunks: AsyncGenerator[bytes, None], media: str, stream: bool
    ) -> None:
        self.host, self.chunks, self.media, self.stream = host, chunks, media, stream
        self.finished = False
        self.ready = _READY.get()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.host._track(+1)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, receive, tg.cancel_scope)
                await self._serve(send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.chunks.aclose()
            self.host._track(-1, self.finished)

    @staticmethod
    async def _watch(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _serve(self, send: Send) -> None:
        async with self.host._slot():
            await asyncio.sleep(max(0.0, self.ready - time.monotonic()) + self.host.latency)
            headers: list[tuple[bytes, bytes]] | None = [(b"content-type", self.media.encode())]
            async for chunk in self.chunks:
                if headers is not None:
                    if not self.stream:
                        headers.append((b"content-length", str(len(chunk)).encode()))
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    headers = None
                await send({"type": "http.response.body", "body": chunk, "more_body": self.stream})
            self.finished = True
        if self.stream:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class StandIn:
    """A fake Ollama host served by uvicorn on a background thread.

    `load_time` (seconds) is what a request for a model not in memory waits while Ollama
    loads it (requests meanwhile wait for the same load); the model is listed by /api/ps
    once loaded, until its keep_alive runs out (Ollama's scheduler). Default 0: no wait.

    Tests may change `models`, `latency`, `token_delay`, `tokens`, `max_parallel` and
    `unload_delay` (seconds a model stays listed by /api/ps after Ollama answered its unload:
    its scheduler frees it in the background) and `progress_delay` (seconds between two lines
    of pull, push or create progress) and `blob_read_delay` (seconds the host pauses after
    each piece of an upload it reads: a slow disk) at any time. `active` counts inference
    requests from arrival (including those queued behind `max_parallel`) to their end; each
    then counts as `completed` or as one of `disconnects`.
    """

    def __init__(
        self,
        models: Iterable[str] = ("llama3:latest",),
        *,
        port: int = 0,
        latency: float = 0.0,
        token_delay: float = 0.0,
        tokens: int = 5,
        max_parallel: int | None = None,
        version: str = "0.12.0",
        embed_dim: int = 8,
        name: str = "standin",
        load_time: float = 0.0,
    ) -> None:
        self.models: set[str] = {_full(m) for m in models}
        self.port, self.latency, self.token_delay, self.tokens = port, latency, token_delay, tokens
        self.max_parallel, self.version, self.embed_dim = max_parallel, version, embed_dim
        self.name, self.load_time = name, load_time
        self.unload_delay = self.progress_delay = self.blob_read_delay = 0.0
        # /api/status: "none" (cloud enabled), or "env", "config", "both": disabled by
        # OLLAMA_NO_CLOUD and/or server.json (Ollama's envconfig.NoCloudSource); None: an
        # Ollama older than the route (404).
        self.cloud_source: str | None = "none"
        self.requests: list[tuple[str, str, Body]] = []
        self.active = self.peak_active = self.completed = self.disconnects = self.tokens_sent = 0
        self._lock = threading.Lock()
        self._faults: list[Any] = []  # [status, error, remaining]
        self._cuts: list[Any] = []  # [error, after, remaining]
        self._loaded: dict[str, datetime] = {}  # model: when its keep_alive runs out
        self._loading: dict[str, tuple[float, datetime]] = {}  # model: (loaded at, expiry)
        self._blobs: set[str] = set()
        self._ids = itertools.count(1)
        self._born = _now()
        self._sem: tuple[int, asyncio.Semaphore] | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[Any] | None = None
        self.app = self._router()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:11500``."""
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> uvicorn.Config:
        """The uvicorn configuration this stand-in serves with."""
        return uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="httptools",
            log_level="warning",
            access_log=False,
            lifespan="off",
        )

    def start(self) -> StandIn:
        """Serve on a daemon thread; return once the port accepts connections."""
        self._sem = None
        self._server = server = uvicorn.Server(self.config())
        self._thread = thread = threading.Thread(
            target=asyncio.run,
            args=(self._serve(server),),
            name=f"standin-{self.name}",
            daemon=True,
        )
        thread.start()
        # 5 ms polls: a stand-in starts on nearly every test's path.
        what = f"stand-in {self.name!r} started"
        wait_until(lambda: server.started or not thread.is_alive(), 10, what, interval=0.005)
        if not server.started:
            raise RuntimeError(f"stand-in {self.name!r} failed to start on port {self.port}")
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    async def _serve(self, server: uvicorn.Server) -> None:
        self._loop, self._main = asyncio.get_running_loop(), asyncio.current_task()
        with suppress(asyncio.CancelledError):
            await server.serve()

    def stop(self) -> None:
        """Shut down like a restarting Ollama: close the port, give in-flight requests half a
        second, then drop their connections. `start()` again reuses the same port."""
        server, thread, loop = self._server, self._thread, self._loop
        if server is None or thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._halt(server), loop)
        thread.join(5)
        self._server = self._thread = self._loop = self._main = None

    async def _halt(self, server: uvicorn.Server) -> None:
        """uvicorn's shutdown without its 0.1 s polling ticks (stop() is on every test's path)."""
        for listener in server.servers:
            listener.close()
        state = server.server_state
        for conn in list(state.connections):
            conn.shutdown()
        await _until(lambda: not state.connections, 0.5)
        for conn in list(state.connections):
            conn.transport.close()
        await _until(lambda: not state.tasks, 1.0)
        if self._main is not None:
            self._main.cancel()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, status: int, error: str, count: int = 1) -> None:
        """Answer the next `count` model-bound requests, pulls or blob uploads with `status`
        and ``{"error": error}``."""
        with self._lock:
            self._faults = [status, error, count]

    def fail_mid_stream(self, error: str, after: int = 2, count: int = 1) -> None:
        """End the next `count` streamed generations after `after` chunks with an error line."""
        with self._lock:
            self._cuts = [error, after, count]

    def count(self, path: str) -> int:
        """How many requests hit `path`."""
        return sum(1 for _, p, _ in list(self.requests) if p == path)

    def reset_counters(self) -> None:
        """Forget recorded requests and zero the counters (`active` stays truthful)."""
        with self._lock:
            self.requests.clear()
            self.completed = self.disconnects = self.tokens_sent = 0
            self.peak_active = self.active

    def wait_for(self, predicate: Callable[[StandIn], bool], timeout: float = 5.0) -> None:
        """Poll `predicate(self)` until true; raise TimeoutError after `timeout` seconds."""
        what = f"a condition on stand-in {self.name!r}"
        wait_until(lambda: predicate(self), timeout, what, interval=0.005)

    def _take(self, queue: list[Any], wanted: bool = True) -> list[Any] | None:
        """Consume one use of an injected fault, if any is pending."""
        with self._lock:
            if not wanted or not queue or queue[-1] <= 0:
                return None
            queue[-1] -= 1
            return queue

    def _track(self, delta: int, finished: bool = False) -> None:
        with self._lock:
            self.active += delta
            self.peak_active = max(self.peak_active, self.active)
            if delta < 0:
                self.completed += finished
                self.disconnects += not finished

    def _slot(self) -> Any:
        if self.max_parallel is None:
            return nullcontext()
        if self._sem is None or self._sem[0] != self.max_parallel:
            self._sem = (self.max_parallel, asyncio.Semaphore(self.max_parallel))
        return self._sem[1]

    def _find(self, name: str) -> str | None:
        key = _key(name)
        return next((m for m in tuple(self.models) if _key(m) == key), None)

    def _known(self, name: Any) -> str:
        found = self._find(_name(name))
        if found is None:
            raise _Fail(404, f"model '{name}' not found")
        return found

    def _admit(self, name: Any, *, load: bool = True, keep_alive: Any = None) -> str:
        """Validate a model-bound request: keep_alive valid, model given, no injected fault,
        model known. `load`: the model stays loaded for `keep_alive` (default 5 minutes)."""
        expires = _expiry(keep_alive)
        _name(name)
        if fault := self._take(self._faults):
            raise _Fail(fault[0], fault[1])
        found = self._known(name)
        if load:
            self._load_model(found, expires)
        return found

    def _load_model(self, name: str, expires: datetime) -> None:
        """Keep `name` loaded until `expires`; one not in memory first costs `load_time`."""
        self._settle()
        if name in self._loaded or self.load_time <= 0:
            self._loaded[name] = expires
            return
        ready = self._loading.get(name, (time.monotonic() + self.load_time, expires))[0]
        self._loading[name] = (ready, expires)
        _READY.set(ready)

    def _settle(self) -> None:
        """Unload the models whose keep_alive ran out; list those whose load has finished."""
        now, clock = datetime.now(UTC), time.monotonic()
        for name, expires in tuple(self._loaded.items()):
            if expires <= now:
                self._loaded.pop(name, None)
        for name, (ready, expires) in tuple(self._loading.items()):
            if ready <= clock:
                self._loaded[name] = expires
                self._loading.pop(name, None)

    def _unload(self, name: str) -> None:
        """Ollama's expireRunner: the model goes once the scheduler has freed it."""
        if name in self._loaded:
            self._loaded[name] = datetime.now(UTC) + timedelta(seconds=self.unload_delay)

    def _add(self, name: str) -> None:
        if self._find(name) is None:
            self.models.add(_full(name))

    def _entry(self, name: str) -> Body:
        full = _full(name)
        return {
            "name": full,
            "model": full,
            "modified_at": self._born,
            "size": SIZE,
            "digest": _sha(full.lower()),
            "details": DETAILS,
        }

    def _v1_entry(self, name: str) -> Body:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "library"}

    async def _emit(
        self,
        n: int,
        chunk: Callable[[int], bytes] | None,
        last: Callable[[], bytes],
        cut: list[Any] | None,
        error: Callable[[str], bytes],
    ) -> AsyncGenerator[bytes, None]:
        """Produce `n` tokens at `token_delay` pace, streaming `chunk(i)` for each (unless
        `chunk` is None), then `last()`; a `cut` ends the stream early with `error(...)`."""
        for i in range(min(n, cut[1]) if cut else n):
            await asyncio.sleep(self.token_delay)
            with self._lock:
                self.tokens_sent += 1
            if chunk:
                yield chunk(i)
        yield error(cut[0]) if cut else last()

    def _texts(self, body: Body) -> list[str]:
        """Token texts: ``tok<i> ``, or a JSON document spread over the tokens when the
        request asks for structured output."""
        n = max(int(self.tokens), 0)
        fmt = body.get("response_format")
        if not body.get("format") and not (isinstance(fmt, dict) and fmt.get("type") != "text"):
            return [f"tok{i} " for i in range(n)]
        doc = '{"ok": true}'
        return [doc[i * len(doc) // n : (i + 1) * len(doc) // n] for i in range(n)]

    def _stats(self, t0: int, n: int, body: Body) -> Body:
        took = time.perf_counter_ns() - t0
        return {
            "done": True,
            "done_reason": "stop",
            "total_duration": took + 3000,
            "load_duration": 1000,
            "prompt_eval_count": _words(body),
            "prompt_eval_duration": 1000,
            "eval_count": n,
            "eval_duration": took + 1000,
        }

    def _admit_native(self, body: Body, field: str) -> str:
        """`_admit` a generate or chat; an unload (nothing in `field`, keep_alive zero, as
        Ollama tests it) does not load the model."""
        keep_alive = body.get("keep_alive")
        unload = not body.get(field) and durations.is_zero(keep_alive)
        return self._admit(body.get("model"), load=not unload, keep_alive=keep_alive)

    def _load(self, body: Body, name: str, payload: Body) -> _Reply:
        """The answer to an empty prompt: load the model, or unload it with keep_alive 0."""
        reason = "unload" if durations.is_zero(body.get("keep_alive")) else "load"
        if reason == "unload":
            self._unload(name)
        obj = {
            "model": body["model"],
            "created_at": _now(),
            **payload,
            "done": True,
            "done_reason": reason,
        }
        return _Reply(self, _once(lambda: orjson.dumps(obj)), JSON, False)

    def _native(self, body: Body, wrap: Callable[[str, str, bool], Body], extra: Body) -> _Reply:
        """A generate/chat answer; `wrap(text, thinking, with_tools)` shapes the payload."""
        model, t0, stream = body["model"], time.perf_counter_ns(), body.get("stream") is not False
        texts = self._texts(body)
        n = len(texts)
        thinks = [f"think{i} " if body.get("think") else "" for i in range(n)]

        def chunk(i: int) -> bytes:
            payload = wrap(texts[i], thinks[i], i == n - 1)
            return _line({"model": model, "created_at": _now(), **payload, "done": False})

        def last() -> bytes:
            payload = wrap("", "", False) if stream else wrap("".join(texts), "".join(thinks), True)
            obj = {
                "model": model,
                "created_at": _now(),
                **payload,
                **extra,
                **self._stats(t0, n, body),
            }
            return _line(obj) if stream else orjson.dumps(obj)

        chunks = self._emit(
            n,
            chunk if stream else None,
            last,
            self._take(self._cuts, stream),
            lambda msg: _line({"error": msg}),
        )
        return _Reply(self, chunks, NDJSON if stream else JSON, stream)

    def _openai(self, body: Body, chat: bool) -> _Reply:
        """A /v1 chat or text completion, streamed as SSE when asked."""
        self._admit(body.get("model"))
        stream, texts, p = bool(body.get("stream")), self._texts(body), _words(body)
        n, kind = len(texts), "chat.completion" if chat else "text_completion"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}",
            "object": kind,
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_ollama",
        }
        head = {**base, "object": f"{kind}.chunk"} if chat else base
        usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True

        def choice(text: str, finish: str | None) -> Body:
            if not chat:
                return {"text": text, "index": 0, "finish_reason": finish}
            message = {"role": "assistant", "content": text}
            return {"index": 0, "delta" if stream else "message": message, "finish_reason": finish}

        def event(choices: list[Body], counts: Body | None = None) -> bytes:
            """A chunk in Ollama's field order: a completion's ``choices`` come before its
            ``model`` (``openai.CompletionChunk``), and with ``include_usage`` each of its
            chunks carries a zero ``usage`` (``middleware/openai.go``, CompleteWriter)."""
            if chat:
                return _event({**head, "choices": choices, **({"usage": counts} if counts else {})})
            obj = {k: head[k] for k in ("id", "object", "created")}
            obj |= {"choices": choices, "model": head["model"], "system_fingerprint": "fp_ollama"}
            if with_usage:
                obj["usage"] = counts or dict.fromkeys(usage, 0)
            return _event(obj)

        def chunk(i: int) -> bytes:
            return event([choice(texts[i], None)])

        def last() -> bytes:
            if not stream:
                return orjson.dumps(
                    {**base, "choices": [choice("".join(texts), "stop")], "usage": usage}
                )
            out = event([choice("", "stop")])
            if with_usage:
                out += event([], usage)
            return out + b"data: [DONE]\n\n"

        chunks = self._emit(
            n,
            chunk if stream else None,
            last,
            self._take(self._cuts, stream),
            lambda msg: _event(_error("/v1", 500, msg)),
        )
        return _Reply(self, chunks, SSE if stream else JSON, stream)

    def _progress(self, body: Body, steps: list[Body]) -> Response:
        """Pull, push or create progress: each step written on its own, `progress_delay`
        apart (Ollama's streamResponse flushes every line); the last alone without stream."""
        if body.get("stream") is False:
            return _json(steps[-1])

        async def paced() -> AsyncGenerator[bytes, None]:
            for step in steps:
                await asyncio.sleep(self.progress_delay)
                yield _line(step)

        return StreamingResponse(paced(), media_type=NDJSON)

    def _ps(self, request: Request, body: Body) -> Response:
        """Loaded models, the longest to live first (Ollama's PsHandler); a model whose
        keep_alive ran out is unloaded."""
        self._settle()
        loaded = sorted(self._loaded.items(), key=lambda item: item[1], reverse=True)
        return _json(
            {
                "models": [
                    {
                        **self._entry(m),
                        "expires_at": expires.isoformat(),
                        "size_vram": SIZE,
                        "context_length": 8192,
                    }
                    for m, expires in loaded
                ]
            }
        )

    def _show(self, request: Request, body: Body) -> Response:
        name = self._admit(body.get("model") or body.get("name"), load=False)
        return _json(
            {
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n',
                "parameters": "num_ctx                        8192",
                "template": "{{ .Prompt }}",
                "details": DETAILS,
                "modified_at": self._born,
                "model_info": {
                    "general.architecture": "llama",
                    "general.parameter_count": 8030261248,
                    "llama.context_length": 8192,
                    "llama.embedding_length": self.embed_dim,
                },
                "capabilities": ["completion", "tools", "thinking"],
            }
        )

    def _generate(self, request: Request, body: Body) -> _Reply:
        name = self._admit_native(body, "prompt")
        if not body.get("prompt"):
            return self._load(body, name, {"response": ""})

        def wrap(text: str, thinking: str, _: bool) -> Body:
            return {"response": text, **({"thinking": thinking} if thinking else {})}

        return self._native(body, wrap, {"context": [1, 2, 3]})

    def _chat(self, request: Request, body: Body) -> _Reply:
        messages, tools = body.get("messages") or [], body.get("tools")
        if not isinstance(messages, list):
            raise _Fail(400, "messages must be an array")
        name = self._admit_native(body, "messages")
        if not messages:
            return self._load(body, name, {"message": {"role": "assistant", "content": ""}})
        calls = None
        if isinstance(tools, list) and tools and isinstance(tools[0], dict):
            fn = tools[0].get("function") or {}
            calls = [{"function": {"name": fn.get("name", "tool"), "arguments": {"x": 1}}}]

        def wrap(text: str, thinking: str, with_tools: bool) -> Body:
            message: Body = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls and with_tools:
                message["tool_calls"] = calls
            return {"message": message}

        return self._native(body, wrap, {})

    def _embed(self, request: Request, body: Body) -> _Reply:
        self._admit(body.get("model"), keep_alive=body.get("keep_alive"))
        inputs = _inputs(body.get("input"))
        vectors = [_embedding(t, self.embed_dim) for t in inputs]
        obj = {
            "model": body["model"],
            "embeddings": vectors,
            "total_duration": 3000,
            "load_duration": 1000,
            "prompt_eval_count": len(inputs),
        }
        return _Reply(self, _once(lambda: orjson.dumps(obj)), JSON, False)

    def _embeddings(self, request: Request, body: Body) -> _Reply:
        self._admit(body.get("model"))
        prompt = str(body.get("prompt") or "")
        obj = {"embedding": _embedding(prompt, self.embed_dim) if prompt else []}
        return _Reply(self, _once(lambda: orjson.dumps(obj)), JSON, False)

    def _pull(self, request: Request, body: Body) -> Response:
        name = _name(body.get("model") or body.get("name"))
        if "missing" in name:
            raise _Fail(500, "pull model manifest: file does not exist")
        if fault := self._take(self._faults):
            raise _Fail(fault[0], fault[1])
        self._add(name)
        digest = f"sha256:{_sha(_key(name))}"
        layers = [
            {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 1000, "completed": k}
            for k in (0, 500, 1000)
        ]
        return self._progress(
            body,
            [
                {"status": "pulling manifest"},
                *layers,
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
                {"status": "success"},
            ],
        )

    def _push(self, request: Request, body: Body) -> Response:
        digest = f"sha256:{_sha(_key(self._known(body.get('model') or body.get('name'))))}"
        return self._progress(
            body,
            [
                {"status": "retrieving manifest"},
                {"status": "starting upload", "digest": digest, "total": 1000},
                {"status": "pushing manifest"},
                {"status": "success"},
            ],
        )

    def _create(self, request: Request, body: Body) -> Response:
        name = _name(body.get("model") or body.get("name"))
        if not body.get("from") and not body.get("files"):
            raise _Fail(400, "neither 'from' or 'files' was specified")
        self._add(name)
        layer = _sha(str(body.get("from") or body.get("files")))
        return self._progress(
            body,
            [
                {"status": f"using existing layer sha256:{layer}"},
                {"status": "writing manifest"},
                {"status": "success"},
            ],
        )

    def _copy(self, request: Request, body: Body) -> Response:
        self._known(body.get("source"))
        self._add(_name(body.get("destination")))
        return Response(status_code=200)

    def _delete(self, request: Request, body: Body) -> Response:
        name = self._known(body.get("model") or body.get("name"))
        self.models.discard(name)
        self._loaded.pop(name, None)
        self._loading.pop(name, None)
        return Response(status_code=200)

    def has_blob(self, digest: str) -> bool:
        """Whether the host holds the blob ``digest`` (``sha256:<hex>`` or ``sha256-<hex>``)."""
        return digest.replace(":", "-") in self._blobs

    async def _blob(self, request: Request, body: Body) -> Response:
        """HEAD and POST /api/blobs/:digest as Ollama's HeadBlobHandler and CreateBlobHandler
        (server/routes.go): a blob it has is 200 (the body unread), else the body is hashed
        as it streams in and kept under the digest it really has (manifest.NewLayer), 201
        when that is the one named, else 400. A body cut short keeps nothing."""
        digest = request.path_params["digest"]
        if not BLOB_DIGEST.fullmatch(digest):
            raise _Fail(400, "invalid digest format")
        if self.has_blob(digest):
            return Response(status_code=200)
        if request.method == "HEAD":
            raise _Fail(404, f'blob "{digest}" not found')
        if fault := self._take(self._faults):
            raise _Fail(fault[0], fault[1])
        sha = hashlib.sha256()
        try:
            async for chunk in request.stream():
                sha.update(chunk)
                if self.blob_read_delay:
                    await asyncio.sleep(self.blob_read_delay)
        except ClientDisconnect:
            return Response(status_code=400)  # never sent: the caller is gone
        got = f"sha256:{sha.hexdigest()}"
        self._blobs.add(got.replace(":", "-"))
        if got != digest:
            raise _Fail(400, f'digest mismatch, expected "{digest}", got "{got}"')
        return Response(status_code=201)

    def _v1_chat(self, request: Request, body: Body) -> _Reply:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _Fail(400, "messages must be an array of message objects")
        return self._openai(body, chat=True)

    def _v1_embeddings(self, request: Request, body: Body) -> _Reply:
        self._admit(body.get("model"))
        inputs = _inputs(body.get("input"))
        obj = {
            "object": "list",
            "model": body["model"],
            "data": [
                {"object": "embedding", "embedding": _embedding(t, self.embed_dim), "index": i}
                for i, t in enumerate(inputs)
            ],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        }
        return _Reply(self, _once(lambda: orjson.dumps(obj)), JSON, False)

    def _status(self, request: Request, body: Body) -> Response:
        """Ollama's ``StatusHandler``: an ``api.CloudStatus``, or gin's 404 without it."""
        if self.cloud_source is None:
            return PlainTextResponse("404 page not found", 404)
        disabled = self.cloud_source != "none"
        return _json({"cloud": {"disabled": disabled, "source": self.cloud_source}})

    def _v1_model(self, request: Request, body: Body) -> Response:
        self._known(request.path_params["model"])
        return _json(self._v1_entry(request.path_params["model"]))

    def _v1_messages(self, request: Request, body: Body) -> _Reply:
        """/v1/messages through Ollama's Anthropic layer (``compat``); a cut stream just
        ends, as Ollama's AnthropicWriter drops the chat's error line."""
        _check(compat.check_messages_request, body)
        self._admit(body["model"])
        stream, texts, words = body.get("stream") is True, self._texts(body), _words(body)
        n, call = len(texts), compat.tool_call(body.get("tools"))
        events = compat.AnthropicStream(body["model"], words)

        def chunk(i: int) -> bytes:
            return events.chunk(texts[i], call if i == n - 1 else None)

        def last() -> bytes:
            if stream:
                return events.done(n)
            message = compat.anthropic_message(body["model"], "".join(texts), call, (words, n))
            return orjson.dumps(message)

        cut = self._take(self._cuts, stream)
        chunks = self._emit(n, chunk if stream else None, last, cut, lambda _: b"")
        return _Reply(self, chunks, SSE if stream else JSON, stream)

    def _v1_responses(self, request: Request, body: Body) -> _Reply:
        """/v1/responses through Ollama's Responses layer (``compat``); a cut stream just
        ends, as Ollama's ResponsesWriter drops the chat's error line."""
        _check(compat.check_responses_request, body)
        self._admit(body.get("model"))
        stream, texts = body.get("stream") is True, self._texts(body)
        usage = (max(1, len(str(body.get("input") or "").split())), len(texts))
        events = compat.ResponsesStream(body)

        def chunk(i: int) -> bytes:
            return events.chunk(texts[i])

        def last() -> bytes:
            if stream:
                return events.done(usage)
            return orjson.dumps(compat.response_message(body, "".join(texts), usage))

        cut = self._take(self._cuts, stream)
        chunks = self._emit(len(texts), chunk if stream else None, last, cut, lambda _: b"")
        return _Reply(self, chunks, SSE if stream else JSON, stream)

    async def _v1_transcriptions(self, request: Request, body: Body) -> _Reply:
        """/v1/audio/transcriptions as Ollama's TranscriptionMiddleware: a multipart form
        (``model``, ``file``, ``response_format``...) whose audio goes to the model; the
        answer is ``{"text": ...}``, or the bare text with ``response_format=text``. ``body``
        records the text fields and, under ``file``, the audio's bytes."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise _Fail(
                400,
                "failed to parse multipart form: request Content-Type isn't multipart/form-data",
            )
        try:
            form = await request.form()
        except MultiPartException as exc:
            raise _Fail(400, f"failed to parse multipart form: {exc.message}") from None
        try:
            body.update((k, v) for k, v in reversed(form.multi_items()) if isinstance(v, str))
            upload = form.get("file")
            body["file"] = await upload.read() if isinstance(upload, UploadFile) else None
        finally:
            await form.close()
        if not body.get("model"):
            raise _Fail(400, "model is required")
        if body["file"] is None:
            raise _Fail(400, "file is required: http: no such file")
        if not body["file"]:
            raise _Fail(400, "audio file is empty")
        self._admit(body["model"])
        texts, as_text = self._texts({}), body.get("response_format") == "text"
        text = "".join(texts).strip()

        def last() -> bytes:
            return text.encode() if as_text else orjson.dumps({"text": text})

        chunks = self._emit(len(texts), None, last, None, lambda _: b"")
        return _Reply(self, chunks, "text/plain" if as_text else JSON, False)

    def _endpoint(self, handler: Handler, json_body: bool) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Any:
            body: Body = {}
            try:
                if json_body:
                    body = _decode(await request.body())
                out = handler(request, body)
                return await out if inspect.isawaitable(out) else out
            except _Fail as exc:
                return _json(_error(request.url.path, exc.status, exc.message), exc.status)
            finally:
                self.requests.append((request.method, request.url.path, body))

        return endpoint

    async def _unrouted(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests.append((scope["method"], scope["path"], {}))
        await PlainTextResponse("404 page not found", 404)(scope, receive, send)

    def _router(self) -> Router:
        def models() -> list[str]:
            return [_full(m) for m in sorted(self.models)]

        table: list[tuple[str, str, Handler]] = [
            ("GET", "/", lambda r, b: PlainTextResponse("Ollama is running")),
            ("GET", "/api/version", lambda r, b: _json({"version": self.version})),
            ("GET", "/api/status", self._status),
            (
                "GET",
                "/api/tags",
                lambda r, b: _json({"models": [self._entry(m) for m in models()]}),
            ),
            ("GET", "/api/ps", self._ps),
            ("POST", "/api/show", self._show),
            ("POST", "/api/generate", self._generate),
            ("POST", "/api/chat", self._chat),
            ("POST", "/api/embed", self._embed),
            ("POST", "/api/embeddings", self._embeddings),
            ("POST", "/api/pull", self._pull),
            ("POST", "/api/push", self._push),
            ("POST", "/api/create", self._create),
            ("POST", "/api/copy", self._copy),
            ("DELETE", "/api/delete", self._delete),
            ("HEAD,POST", "/api/blobs/{digest}", self._blob),
            ("POST", "/v1/chat/completions", self._v1_chat),
            ("POST", "/v1/completions", lambda r, b: self._openai(b, chat=False)),
            ("POST", "/v1/embeddings", self._v1_embeddings),
            (
                "GET",
                "/v1/models",
                lambda r, b: _json(
                    {"object": "list", "data": [self._v1_entry(m) for m in models()]}
                ),
            ),
            ("GET", "/v1/models/{model:path}", self._v1_model),
            ("POST", "/v1/messages", self._v1_messages),
            ("POST", "/v1/responses", self._v1_responses),
            ("POST", FORM_PATH, self._v1_transcriptions),
        ]
        routes = [
            Route(
                path,
                self._endpoint(fn, methods in ("POST", "DELETE") and path != FORM_PATH),
                methods=methods.split(","),
            )
            for methods, path, fn in table
        ]
        return Router(routes, default=self._unrouted)


def main(argv: list[str] | None = None) -> None:
    """Serve one stand-in in the foreground until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m oshepherd.testing.standin", description=__doc__
    )
    parser.add_argument("--port", type=int, default=11434, help="port on 127.0.0.1 [11434]")
    parser.add_argument("--models", default="llama3:latest", help="comma-separated model names")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds before the first token [0]"
    )
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens [0]")
    parser.add_argument("--tokens", type=int, default=5, help="tokens per answer [5]")
    parser.add_argument(
        "--max-parallel", type=int, default=None, help="requests run at once; more wait [no limit]"
    )
    parser.add_argument(
        "--load-time",
        type=float,
        default=0.0,
        help="seconds the first request for a model not loaded waits for its load [0]",
    )
    args = parser.parse_args(argv)
    stand = StandIn(
        [m for m in args.models.split(",") if m],
        port=args.port,
        latency=args.latency,
        token_delay=args.token_delay,
        tokens=args.tokens,
        max_parallel=args.max_parallel,
        load_time=args.load_time,
    )
    uvicorn.Server(stand.config()).run()


if __name__ == "__main__":
    main()
