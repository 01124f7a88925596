"""Redis commands of one event-loop turn, sent as one pipeline (ioredis's auto-pipelining).

Under load many requests queue their jobs in the same turn of the loop. Sent one by one,
each EVALSHA is its own pool checkout, socket write, read and retry wrapper in the API, and
its own read and write in Redis. ``AutoPipeline`` gathers the commands issued during a turn
and sends them together at the start of the next: one write, one read, one connection. A
lone command (concurrency 1) goes out as it would without it, one turn later.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

__all__ = ["AutoPipeline"]

_Pending = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class AutoPipeline:
    """Sends the commands given to ``execute`` during one loop turn as one pipeline of
    ``redis`` (no MULTI: each command stands alone, as if sent by itself)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: list[_Pending] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def execute(self, *args: Any) -> Any:
        """Run one command (``args`` as redis-py's ``execute_command``) and return its reply,
        parsed as redis-py parses it. Raises what the command would raise by itself
        (``ResponseError`` and its kinds for an error reply, ``ConnectionError`` and
        ``TimeoutError`` when Redis is away), after redis-py's own retries of the client.

        A caller cancelled while waiting does not take the command back: it may still run.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._pending:
            task = asyncio.create_task(self._send())  # runs once this turn's callers are in
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._pending.append((args, future))
        return await future

    async def run_script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """Run ``script`` (registered on this pipeline's client) as its ``__call__`` would:
        EVALSHA, and SCRIPT LOAD then EVALSHA again if Redis has lost it (a restart, a
        failover). Raises as ``execute``."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = await self._redis.script_load(script.script)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _send(self) -> None:
        batch, self._pending = self._pending, []
        if len(batch) == 1:
            ((args, future),) = batch
            try:
                reply = await self._redis.execute_command(*args)
            except BaseException as exc:  # the caller's to handle, as without the pipeline
                _settle(future, exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                _settle(future, reply)
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args, _ in batch:
                    pipe.execute_command(*args)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # a cancel (the API stopping) too: no caller is left
            for _, future in batch:
                _settle(future, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            _settle(future, reply)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """Hand ``outcome`` (a reply, or an exception to raise) to a caller still waiting."""
    if future.done():  # its caller was cancelled
        return
    if isinstance(outcome, asyncio.CancelledError):
        future.cancel()
    elif isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
