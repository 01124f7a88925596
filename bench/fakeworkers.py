"""``python -m bench.fakeworkers``: many workers on the wire, one light process, no Ollama.

Each fake does to Redis what an idle worker does (``oshepherd.worker.runtime``): it
registers its entry with a TTL every heartbeat (SET PX, ZADD, ZREMRANGEBYSCORE in one
pipeline), BRPOPs its queues (its own worker queue and its loaded models' queues, every
priority step) with the worker transport's timeout, and while it has cold models looks at
their queues with ``OLDEST_SCRIPT`` on the worker's clock
(``runtime.COLD_POLL``, ``COLD_POLL_IDLE``). It never takes a job: the bench sends none to its
models. Entries are built from templates (a real worker's model and running entries, as
JSON in the file named by ``--templates``), renamed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
from redis.asyncio import Redis

from oshepherd.protocol import (
    OLDEST_SCRIPT,
    PRIORITY_STEPS,
    WORKERS_INDEX,
    WorkerEntry,
    model_queue,
    queue_key,
    worker_key,
    worker_queue,
)
from oshepherd.worker.runtime import COLD_POLL, COLD_POLL_IDLE
from oshepherd.worker.transport import Transport

__all__ = ["fake_models", "main"]

HEARTBEAT = 2.0  # WorkerSettings.heartbeat_interval's default
TTL = 3 * HEARTBEAT


def fake_models(index: int, count: int, each: int) -> list[str]:
    """The ``each`` models fake number ``index`` holds among ``count`` (model0...)."""
    return [f"model{(index * each // 2 + k) % count}:latest" for k in range(each)]


def _entry(index: int, held: list[str], templates: dict[str, Any]) -> WorkerEntry:
    now = time.time()
    models = [{**templates["model"], "name": m, "model": m} for m in held]
    running = [{**templates["running"], "name": held[0], "model": held[0]}]
    return WorkerEntry(
        id=f"fake-{index}", hostname=f"gpu{index}", ollama_url=f"http://gpu{index}:11434",
        version="0.12.0", healthy=True, error="", models=models, running=running, slots=4,
        in_flight=0, started_at=now, expires=now + TTL, last_seen=now,
    )  # fmt: skip


async def _heartbeat(redis: Redis, entry: WorkerEntry) -> None:
    while True:
        now = time.time()
        entry.expires, entry.last_seen = now + TTL, now
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(entry.id), entry.to_json(), px=int(TTL * 1000))
            pipe.zadd(WORKERS_INDEX, {entry.id: now + TTL})
            pipe.zremrangebyscore(WORKERS_INDEX, "-inf", now)
            await pipe.execute()
        await asyncio.sleep(HEARTBEAT)


async def _consume(redis: Redis, worker_id: str, warm: list[str]) -> None:
    queues = [worker_queue(worker_id), *(model_queue(m) for m in warm)]
    keys = [queue_key(q, step) for step in PRIORITY_STEPS for q in queues]
    while True:
        await redis.brpop(keys, timeout=Transport.brpop_timeout)  # type: ignore[arg-type]


async def _watch_cold(redis: Redis, cold: list[str]) -> None:
    script = redis.register_script(OLDEST_SCRIPT)
    keys = [queue_key(model_queue(m), step) for m in cold for step in PRIORITY_STEPS]
    waiting = False
    while True:
        await asyncio.sleep(COLD_POLL if waiting else COLD_POLL_IDLE)
        stamps = await script(keys=keys)
        waiting = any(stamp is not None for stamp in stamps)


async def _run(url: str, count: int, models: int, each: int, templates: dict[str, Any]) -> None:
    tasks = []
    for index in range(count):
        held = fake_models(index, models, each)
        entry = _entry(index, held, templates)
        blocking = Redis.from_url(url)  # a BRPOP holds its connection, as kombu's does
        shared = Redis.from_url(url)
        tasks += [
            asyncio.create_task(_heartbeat(shared, entry)),
            asyncio.create_task(_consume(blocking, entry.id, held[:1])),
            asyncio.create_task(_watch_cold(shared, held[1:])),
        ]
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fakeworkers", description=__doc__)
    parser.add_argument("--redis", required=True, help="redis:// URL of the fleet")
    parser.add_argument("--count", type=int, required=True, help="fake workers")
    parser.add_argument("--models", type=int, required=True, help="distinct models in all")
    parser.add_argument("--each", type=int, required=True, help="models per fake")
    parser.add_argument("--templates", type=Path, required=True, help="JSON: model, running")
    args = parser.parse_args(argv)
    templates = orjson.loads(args.templates.read_bytes())
    uvloop.run(_run(args.redis, args.count, args.models, args.each, templates))


if __name__ == "__main__":
    main()
