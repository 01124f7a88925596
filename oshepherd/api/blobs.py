"""Blob uploads to the fleet: one ``POST /api/blobs/:digest`` streamed to every target host.

Workers may sit behind NAT and only connect out to Redis, so the bytes travel through it::

    client ──body──▶ API   reads CHUNK bytes at a time, hashing them as they pass
                      │    RPUSH each chunk on one list per target worker (with a TTL),
                      │    never more than WINDOW chunks ahead of that worker's acks
                      ▼
                    Redis ──BLPOP──▶ worker ──chunked POST /api/blobs/<digest>──▶ its Ollama
                      ▲                 │
                      └── acks (PUBLISH)┘

Each target gets a job on its own queue naming the upload (``Job.upload``), and answers
with its Ollama's status, followed like any fan-out (``oshepherd.api.fanout``). At the end
of the body the API compares the digest: if it matches, each list ends with ``BlobEnd``
and the hosts finish the blob; if not, with ``BlobAbort``, and the workers break their
requests off, so no host keeps a byte (Ollama itself would keep the blob under its real
digest). A target that ends early (its host had the blob: 200; or it failed) gets no more
chunks; once every target has ended, the rest of the body is left unread, as Ollama does.

A worker acks each chunk it takes with the count it has taken (``protocol.BlobAck``),
published on a reply channel of this API's named by the upload (``blob_ack_channel``): it
arrives through the process's one Pub/Sub subscription (``Inboxes``), a worker needs no
list push, and an ack that comes after the upload has ended is simply not delivered. Acks
lost with a dropped connection cost a tick: the lengths of the full targets' lists then
tell how many chunks they took.

Memory stays bounded whatever the blob's size: the API holds one chunk, Redis at most
``WINDOW`` per target, a worker one. A client that hangs up cancels every job (their
Ollama requests break off) and the upload's keys are deleted; keys that outlive an API
that died expire after ``protocol.BLOB_TTL`` seconds. While the API waits for room in a
slow target's window it does not read the body, so it sees a hang-up at its next read:
when the window moves, or when the stalled target's job fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from oshepherd.api.dispatcher import Dispatcher
from oshepherd.api.errors import ApiError, RedisUnavailable, error_response
from oshepherd.api.fanout import Fanout
from oshepherd.api.inbox import LOST, Inbox, Inboxes
from oshepherd.api.watched import until_disconnect
from oshepherd.protocol import (
    BLOB_DATA,
    BLOB_TTL,
    BlobAbort,
    BlobAck,
    BlobEnd,
    ProtocolError,
    WorkerEntry,
    blob_chunks_key,
    blob_key,
    new_id,
)

__all__ = ["CHUNK", "WINDOW", "BlobUpload", "BlobUploadResponse"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per list item (at least; a read of the body is never split)
WINDOW = 4  # chunks a target may lag behind: what Redis holds for it, at most
TICK = 0.5  # seconds between looks at ended targets (and at lists) while a window is full
TTL_MS = int(BLOB_TTL * 1000)


class BlobUpload:
    """One upload of the blob ``digest`` to ``targets``; ``run`` it, then ``close`` it."""

    def __init__(
        self,
        redis: Redis,
        dispatcher: Dispatcher,
        inboxes: Inboxes,
        digest: str,
        targets: Sequence[WorkerEntry],
    ) -> None:
        self._redis = redis
        self._digest = digest
        self._id = new_id()
        self._acks: Inbox = inboxes.open(self._id)  # before any job: Pub/Sub keeps nothing
        self._fanout = Fanout(dispatcher, "blob upload", targets, progress=False)
        self._workers = [w.id for w in targets]
        self._live = list(self._workers)  # targets still taking chunks
        self._acked = dict.fromkeys(self._workers, 0)
        self._sent = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, receive: Receive) -> int:
        """Stream the request body (read from ``receive``) to every target; the status to
        answer: 201, or 200 when every host already had the blob.

        Raises ``ApiError``: the failed targets and their errors (``Fanout.failure``), or
        ``RedisUnavailable``; ``ClientDisconnect`` when the client hangs up.
        """
        try:
            await self._redis.set(blob_key(self._id), 1, px=TTL_MS)
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc
        self._tasks.append(asyncio.create_task(self._keep_alive()))
        path = f"/api/blobs/{self._digest}"
        await self._fanout.start("POST", path, "", upload=self._id)
        collecting = asyncio.create_task(self._collect())
        self._tasks.append(collecting)
        size, got = await self._stream(receive)
        if self._live:
            closing = self._closing(size, got)
            log.info("blob upload %s: %s, %d bytes: %s", self._id, self._digest, size, closing)
            await self._push(closing.encode(), wait=False)
        await until_disconnect(receive, _wait(collecting))
        failure = await self._fanout.failure()
        if failure is not None:
            raise failure
        created = any(o.status != 200 for o in self._fanout.outcomes.values())
        return 201 if created else 200

    async def close(self) -> None:
        """Cancel every job still running and delete the upload's keys."""
        self._acks.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._fanout.close()
        try:
            await self._redis.delete(*self._keys(self._workers))
        except RedisError as exc:
            log.warning("blob upload %s: keys left to expire: %r", self._id, exc)

    async def _stream(self, receive: Receive) -> tuple[int, str]:
        """Push the body in chunks while any target takes them; its size and digest."""
        sha = hashlib.sha256()
        size = 0
        pieces: list[bytes] = [BLOB_DATA]
        held = 0
        more = True
        while more and self._live:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            piece: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            sha.update(piece)
            size += len(piece)
            pieces.append(piece)
            held += len(piece)
            if held >= CHUNK or (not more and held):
                await self._push(b"".join(pieces), wait=True)
                pieces, held = [BLOB_DATA], 0
        return size, f"sha256:{sha.hexdigest()}"

    def _closing(self, size: int, got: str) -> BlobEnd | BlobAbort:
        """The last item: the end, or an abort when the bytes are not the blob named (in
        Ollama's words, server/routes.go's CreateBlobHandler)."""
        if got == self._digest:
            return BlobEnd(size)
        return BlobAbort(400, f'digest mismatch, expected "{self._digest}", got "{got}"')

    async def _push(self, item: bytes, *, wait: bool) -> None:
        """``item`` on the list of every live target, once each has room (``wait``)."""
        if wait:
            await self._wait_for_room()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for worker in self._live:
                    key = blob_chunks_key(self._id, worker)
                    pipe.rpush(key, item)
                    pipe.pexpire(key, TTL_MS)
                await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc
        self._sent += 1

    async def _wait_for_room(self) -> None:
        """Until every live target has fewer than ``WINDOW`` chunks not yet taken."""
        while True:
            await self._drop_ended()
            full = [w for w in self._live if self._sent - self._acked[w] >= WINDOW]
            if not full:
                return
            raw = await self._acks.get(TICK)
            if raw is None or raw == LOST:  # an ack may have been lost: the lists tell
                await self._count_taken(full)
                continue
            try:
                ack = BlobAck.decode(raw)
            except ProtocolError as exc:
                log.warning("blob upload %s: %s", self._id, exc)
                continue
            if ack.worker in self._acked:  # a count never above what was sent
                self._acked[ack.worker] = max(self._acked[ack.worker], min(ack.taken, self._sent))

    async def _count_taken(self, workers: Sequence[str]) -> None:
        """What ``workers`` took, from what is left on their lists."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker in workers:
                    pipe.llen(blob_chunks_key(self._id, worker))
                lengths = await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc
        for worker, length in zip(workers, lengths, strict=True):
            self._acked[worker] = max(self._acked[worker], self._sent - int(length))

    async def _drop_ended(self) -> None:
        """Targets whose job has ended take no more chunks; their lists go."""
        ended = [w for w in self._live if w in self._fanout.outcomes]
        if not ended:
            return
        self._live = [w for w in self._live if w not in ended]
        try:
            await self._redis.delete(*(blob_chunks_key(self._id, w) for w in ended))
        except RedisError as exc:
            raise RedisUnavailable(exc) from exc

    async def _collect(self) -> None:
        """Take the targets' outcomes as they come (``Fanout.outcomes``)."""
        async for _ in self._fanout.lines():
            pass

    async def _keep_alive(self) -> None:
        """Refresh the keys' TTLs while the upload runs (a slow client is no dead API)."""
        while True:
            await asyncio.sleep(BLOB_TTL / 3)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key in self._keys(self._live):
                        pipe.pexpire(key, TTL_MS)
                    await pipe.execute()
            except RedisError as exc:
                log.warning("blob upload %s: TTLs not refreshed: %r", self._id, exc)

    def _keys(self, workers: Sequence[str]) -> list[str]:
        keys = [blob_key(self._id)]
        return keys + [blob_chunks_key(self._id, w) for w in workers]


async def _wait(task: asyncio.Task[None]) -> None:
    await task


class BlobUploadResponse(Response):
    """Runs a ``BlobUpload`` as the request's response: it reads the body itself, then
    answers with the upload's status, or its error in Ollama's shape. A client that hangs
    up gets nothing; the upload is closed whatever happens."""

    def __init__(self, upload: BlobUpload, path: str) -> None:
        self.background = None
        self._upload = upload
        self._path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = Response(status_code=await self._upload.run(receive))
        except ClientDisconnect:
            log.info("%s: client went away", self._path)
            return
        except ApiError as exc:
            answer = error_response(self._path, exc)
        finally:
            await self._upload.close()
        await answer(scope, receive, send)
