"""The FastAPI application and the server that runs it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.middleware import Middleware
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from oshepherd import __version__, logs
from oshepherd.api.auth import Authenticate, KeyTable
from oshepherd.api.coalesce import CoalescingHttpProtocol
from oshepherd.api.errors import install_handlers
from oshepherd.api.gateway import Gateway
from oshepherd.api.limits import Limiter
from oshepherd.api.metrics import Observe
from oshepherd.api.protections import (
    ALLOWED_HEADERS,
    CORS_MAX_AGE,
    CORS_METHODS,
    HostCheck,
    OllamaCORS,
    listens_on_loopback,
    origin_regex,
)
from oshepherd.api.requestid import RequestId
from oshepherd.api.routes import anthropic, dashboard, fleet, manage, ollama, openai
from oshepherd.api.routes import keys as key_routes
from oshepherd.api.routes import metrics as metrics_routes
from oshepherd.api.routes import usage as usage_routes
from oshepherd.config import ApiSettings
from oshepherd.keys import parse_networks
from oshepherd.stack import die_with_parent

__all__ = ["create_app", "process_app", "protections", "serve"]

log = logging.getLogger(__name__)

# FastAPI's built-in OpenTelemetry middleware costs about a fifth of a request's time in
# the API process; a gateway on the hot path of every token does without it.
NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def create_app(settings: ApiSettings) -> FastAPI:
    keys = KeyTable()
    limiter = Limiter(lease_ttl=settings.lease_ttl)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway.build(settings)
        await gw.start()
        app.state.gateway = gw
        app.state.keys = keys
        limiter.start(gw.redis)
        with contextlib.suppress(Exception):  # run_forever reports it and tries again
            await keys.refresh(gw.redis)
        _warn_if_open(settings, keys)
        polling = asyncio.create_task(keys.run_forever(gw.redis))
        try:
            yield
        finally:
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
            await limiter.stop()
            await gw.stop()

    app = FastAPI(
        title="oshepherd",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        telemetry=NO_TELEMETRY,
        middleware=[
            Middleware(RequestId),  # every answer carries X-Request-Id, a guard's too
            *protections(settings),
            Middleware(
                Authenticate,
                table=keys,
                allow_ips=parse_networks(settings.allow_ips),
                limiter=limiter,
                metrics_token=settings.metrics_token,
            ),
        ],
    )
    install_handlers(app)
    routers = (
        ollama.router, manage.router, openai.router, anthropic.router, key_routes.router,
        usage_routes.router, fleet.router, metrics_routes.router, dashboard.router,
    )  # fmt: skip
    for router in routers:
        app.include_router(router)
    app.mount(dashboard.ASSETS, dashboard.assets())
    if settings.metrics:  # outermost: counts the requests any middleware refuses too
        paths = [getattr(route, "path", "") for router in routers for route in router.routes]
        app.add_middleware(Observe, routes=paths)
    return app


def protections(settings: ApiSettings) -> list[Middleware]:
    """Ollama's middlewares, outermost first, in its ``GenerateRoutes`` order: the origin
    check and CORS headers (gin-contrib/cors), then the host check
    (``allowedHostsMiddleware``). See ``oshepherd.api.protections``."""
    return [
        Middleware(
            OllamaCORS,
            allow_origin_regex=origin_regex(settings.ollama_origins),
            allow_methods=CORS_METHODS,
            allow_headers=ALLOWED_HEADERS,
            max_age=CORS_MAX_AGE,
        ),
        Middleware(HostCheck, loopback=listens_on_loopback(settings.host)),
    ]


def _warn_if_open(settings: ApiSettings, keys: KeyTable) -> None:
    """Warn when the API listens beyond this machine and no key exists."""
    if keys.keys or listens_on_loopback(settings.host):
        return
    log.warning(
        "the API listens on %s and no API key exists: anyone who reaches it can run, pull "
        "and delete models on every host of the fleet. Create a key to require one on "
        "every request: oshepherd keys create --name admin --scope admin",
        settings.host,
    )


def serve(settings: ApiSettings) -> None:
    """Run the API until SIGINT/SIGTERM; in-flight streams get ``shutdown_grace`` seconds.

    ``API_PROCESSES`` (``start-api --workers``) above 1 runs that many API processes on the
    one port through uvicorn's own supervisor (``uvicorn.supervisors.Multiprocess``, as
    ``uvicorn --workers``): it binds the socket, spawns the processes, which all accept on
    it, restarts one that dies, and on SIGINT/SIGTERM sends each SIGTERM and waits for it.
    Each process builds its own app (``process_app``): its own Gateway, hence its own
    Pub/Sub connection and reply channels (api id), registry, key table and limiter. With
    1, one process serves, without a supervisor. Exits 3 when a process fails to start.

    The client's address is the socket peer's, or, when the peer is one of
    ``TRUSTED_PROXIES``, the one its ``X-Forwarded-For`` names (uvicorn's proxy headers;
    uvicorn itself would trust 127.0.0.1, so a local client could spoof any address).
    """
    trusted = settings.trusted_proxies
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": CoalescingHttpProtocol,  # httptools, a system call per loop turn
        "log_level": settings.loglevel.lower(),
        "log_config": None,  # uvicorn's lines go through the root logger (oshepherd.logs)
        "access_log": settings.loglevel == "DEBUG",
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace),
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted.split(",") if trusted else [],
    }
    if settings.api_processes == 1:
        uvicorn.run(create_app(settings), **options)
        return
    config = uvicorn.Config(
        functools.partial(process_app, settings),  # pickled to each spawned process
        factory=True,
        workers=settings.api_processes,
        **options,
    )
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        sys.exit(STARTUP_FAILURE)


def process_app(settings: ApiSettings) -> FastAPI:
    """The app of one API process under the supervisor, built in that process: its logging
    (a spawned process starts without it), and SIGTERM when the supervisor dies (Linux),
    so that a killed supervisor leaves no process serving on its own."""
    logs.configure(settings.loglevel, settings.log_format)
    die_with_parent()
    return create_app(settings)
