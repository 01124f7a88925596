"""The FastAPI application and the server that runs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from oshepherd import __version__
from oshepherd.api.errors import install_handlers
from oshepherd.api.gateway import Gateway
from oshepherd.api.routes import ollama
from oshepherd.config import ApiSettings

__all__ = ["create_app", "serve"]


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway.build(settings)
        await gw.start()
        app.state.gateway = gw
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="oshepherd", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_handlers(app)
    app.include_router(ollama.router)
    return app


def serve(settings: ApiSettings) -> None:
    """Run the API until SIGINT/SIGTERM; in-flight streams get ``shutdown_grace`` seconds."""
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.loglevel.lower(),
        access_log=settings.loglevel == "DEBUG",
        timeout_graceful_shutdown=settings.shutdown_grace,
    )
