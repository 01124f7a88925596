"""The FastAPI application and the server that runs it."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.middleware.cors import CORSMiddleware

from oshepherd import __version__
from oshepherd.api.errors import install_handlers
from oshepherd.api.gateway import Gateway
from oshepherd.api.routes import manage, ollama, openai
from oshepherd.config import ApiSettings

__all__ = ["create_app", "origin_regex", "serve"]

# Ollama's default CORS origins (envconfig.AllowedOrigins): local pages on any port, and
# the shells of desktop apps and editor extensions.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
SCHEMES = ("http", "https")
APP_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")
# FastAPI's built-in OpenTelemetry middleware costs about a fifth of a request's time in
# the API process; a gateway on the hot path of every token does without it.
NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}
CORS_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


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

    app = FastAPI(
        title="oshepherd",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        telemetry=NO_TELEMETRY,
    )
    install_handlers(app)
    app.include_router(ollama.router)
    app.include_router(manage.router)
    app.include_router(openai.router)
    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=origin_regex(settings.ollama_origins),
        allow_methods=CORS_METHODS,
        allow_headers=["*"],
    )
    return app


def origin_regex(extra: str) -> str:
    """Ollama's default origins plus ``extra`` (``OLLAMA_ORIGINS``: comma-separated, where
    ``*`` matches anything, as Ollama's CORS wildcards do), as one regex."""
    patterns = [origin.strip() for origin in extra.split(",") if origin.strip()]
    for host in LOCAL_HOSTS:
        patterns += [f"{scheme}://{host}{port}" for scheme in SCHEMES for port in ("", ":*")]
    patterns += [f"{scheme}://*" for scheme in APP_SCHEMES]
    return "|".join(".*".join(map(re.escape, pattern.split("*"))) for pattern in patterns)


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
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
    )
