"""A blob upload on the worker: the API's items off Redis, streamed to Ollama as the body.

The API pushes the bytes of ``POST /api/blobs/<digest>`` on a list of this worker's
(``protocol.blob_chunks_key``). ``BlobItems.body`` pops them (BLPOP), acks each one so
the API may push the next (its window), and hands them to aiohttp, which streams them to
the host's Ollama as a chunked request body: the worker holds one item at a time.

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
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from oshepherd.protocol import (
    BLOB_ACK_SCRIPT,
    BLOB_TTL,
    BlobAbort,
    BlobEnd,
    Job,
    ProtocolError,
    blob_acks_key,
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

    def __init__(self, redis: Redis, ack: AsyncScript, upload: str, worker_id: str) -> None:
        self._redis = redis
        self._ack = ack
        self._upload = upload
        self._worker_id = worker_id
        self._key = blob_chunks_key(upload, worker_id)
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
            keys = [blob_key(self._upload), blob_acks_key(self._upload)]
            if not await self._ack(keys=keys, args=[self._worker_id, int(BLOB_TTL * 1000)]):
                self._fail(502, "the gateway dropped the upload")
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
        self._ack = redis.register_script(BLOB_ACK_SCRIPT)

    async def relay(self, job: Job, outbox: Outbox) -> None:
        """Stream the upload to Ollama and publish its answer (201, 200 or its error); a
        body that broke off fails the job with the reason (an abort's own status).

        A blob the host has is 200 without a byte taken, as Ollama answers it: asked with
        ``HEAD`` first, so that an abort (the digest is wrong) can never race the early
        200 of a host that had the blob all along.
        """
        items = BlobItems(self._redis, self._ack, job.upload, self._worker_id)
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
