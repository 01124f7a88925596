"""The API process's long-lived parts, built at start-up and reached from every route."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fastapi import Request
from redis.asyncio import Redis

from oshepherd.api.dispatcher import Dispatcher
from oshepherd.api.inbox import Inboxes
from oshepherd.api.registry import Registry
from oshepherd.config import ApiSettings, redacted
from oshepherd.connections import async_redis
from oshepherd.protocol import new_id

__all__ = ["Gateway", "gateway"]

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    settings: ApiSettings
    redis: Redis
    inboxes: Inboxes
    registry: Registry
    dispatcher: Dispatcher
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: ApiSettings) -> Gateway:
        redis = async_redis(settings.redis, socket_connect_timeout=1, socket_timeout=5)
        inboxes = Inboxes(redis, api_id=new_id()[:12])
        registry = Registry(redis, refresh=settings.registry_refresh)
        dispatcher = Dispatcher(redis, inboxes, registry, settings)
        return cls(settings, redis, inboxes, registry, dispatcher)

    async def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.inboxes.run_forever()),
            asyncio.create_task(self.registry.run_forever()),
        ]
        if not await self.inboxes.wait_ready(timeout=10):
            log.warning(
                "Redis at %s is not answering yet; will keep trying", redacted(self.settings.redis)
            )

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.redis.aclose()


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw
