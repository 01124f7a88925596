"""A blob upload on the worker: the API's items off Redis, streamed to Ollama as the body.

The API pushes the bytes of ``POST /api/blobs/<digest>`` on a list of this worker's
(``protocol.blob_chunks_key``). ``BlobItems.body`` pops them (BLPOP), acks each one so
the API may push the next (its window: a ``BlobAck`` published on the upload's channel,
never a list push, which a worker's Redis user may not do), and hands them to aiohttp,
which streams them to the host's Ollama as a chunked request body: the worker holds one
item at a time.

The body ends (EOF) only at ``BlobEnd``, once the API has checked the digest and the
worker has counted every byte. An abort, an API gone, a short count or a cancelled job
break the request off instead: Ollama's read of the body fails and it keeps nothing
(``manifest.NewLayer`` removes its temporary file), so no host claims half a blob.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NoReturn, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from oshepherd.protocol import (
    BlobAbort,
    BlobAck,
    BlobEnd,
    Job,
    ProtocolError,
    blob_ack_channel,
    blob_chunks_key,
    blob_key,
    decode_blob_part,
)
from oshepherd.worker.ollama import OllamaError, OllamaHost
from oshepherd.worker.outbox import Outbox

__all__ = ["BlobItems", "BlobRelay"]

log = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
# Seconds a BLPOP waits for the next item before the worker looks whether the API still
# runs the upload (a slow client is no reason to fail; a vanished API is).
ITEM_WAIT = 5


class _Stopped(Exception):
    """The upload's body ends without its ``BlobEnd``: aiohttp breaks the request off."""


class BlobItems:
    """The items of one upload for this worker; ``failure`` says why the body broke off."""

    def __init__(self, redis: Redis, job: Job, worker_id: str) -> None:
        self._redis = redis
        self._upload = job.upload
        self._channel = blob_ack_channel(job)
        self._worker_id = worker_id
        self._key = blob_chunks_key(job.upload, worker_id)
        self._taken = 0
        self.failure: BlobAbort | None = None

    async def body(self) -> AsyncIterator[memoryview]:
        """The upload's bytes, item by item, until ``BlobEnd``; raises ``_Stopped`` (which
        aiohttp turns into a broken request) on anything else, ``failure`` set."""
        size = 0
        while True:
            item = await self._next()
            if isinstance(item, BlobAbort):
                self._fail(item.status, item.error)
            if isinstance(item, BlobEnd):
                if item.size != size:
                    self._fail(502, f"the upload lost bytes: {size} of {item.size} arrived")
                return
            size += len(item)
            yield item

    async def _next(self) -> memoryview | BlobEnd | BlobAbort:
        try:
            while True:
                popped = await self._redis.blpop([self._key], timeout=ITEM_WAIT)
                if popped is not None:
                    return await self._take(cast(bytes, popped[1]))  # no decode_responses
                if not await self._redis.exists(blob_key(self._upload)):
                    self._fail(502, "the gateway went away during the upload")
        except RedisError as exc:
            self._fail(502, f"worker {self._worker_id} lost Redis during the upload: {exc!r}")

    async def _take(self, raw: bytes) -> memoryview | BlobEnd | BlobAbort:
        try:
            item = decode_blob_part(raw)
        except ProtocolError as exc:
            self._fail(502, str(exc))
        if isinstance(item, memoryview):
            self._taken += 1
            ack = BlobAck(self._worker_id, self._taken).encode()
            if not await self._redis.publish(self._channel, ack):  # no API listens
                self._fail(502, "the gateway went away during the upload")
        return item

    def _fail(self, status: int, error: str) -> NoReturn:
        self.failure = BlobAbort(status, error)
        raise _Stopped(error)


class BlobRelay:
    """Runs the upload jobs (``Job.upload``) of one worker against its Ollama."""

    def __init__(self, redis: Redis, host: OllamaHost, worker_id: str) -> None:
        self._redis = redis
        self._host = host
        self._worker_id = worker_id

    async def relay(self, job: Job, outbox: Outbox) -> None:
        """Stream the upload to Ollama and publish its answer (201, 200 or its error); a
        body that broke off fails the job with the reason (an abort's own status).

        A blob the host has is 200 without a byte taken, as Ollama answers it: asked with
        ``HEAD`` first, so that an abort (the digest is wrong) can never race the early
        200 of a host that had the blob all along.
        """
        items = BlobItems(self._redis, job, self._worker_id)
        try:
            async with self._host.send("HEAD", job.path, b"", "") as head:
                if head.status == 200:
                    outbox.start(200, head.content_type)
                    outbox.finish()
                    return
            async with self._host.send(job.method, job.path, items.body(), OCTET_STREAM) as answer:
                outbox.start(answer.status, answer.content_type)
                async for chunk in answer.chunks():
                    outbox.write(chunk)
            outbox.finish()
        except OllamaError as exc:
            if items.failure is not None:
                log.info("job %s: upload stopped: %s", job.id, items.failure.error)
                outbox.fail(items.failure.status, items.failure.error)
                return
            log.warning("job %s: %s", job.id, exc)
            outbox.fail(502, f"worker {self._worker_id}: {exc}")
