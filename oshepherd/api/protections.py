"""Ollama's protections in front of every route: the origin check and the host check.

Ollama's ``GenerateRoutes`` (``server/routes.go``) puts two middlewares before any handler,
in this order, and so does ``create_app``:

1. gin-contrib/cors v1.7.2 (``config.go``, ``applyCors``), configured with Ollama's origins
   (``envconfig.AllowedOrigins``: ``OLLAMA_ORIGINS`` plus local pages and app shells) and
   its ``AllowHeaders``. A request without ``Origin``, or whose ``Origin`` is its own
   ``http(s)://<Host>``, is no CORS request and passes. Any other origin that is not
   allowed gets **403 with an empty body, and nothing runs**, preflights included.
   ``OllamaCORS`` makes that refusal, and Starlette's ``CORSMiddleware`` under it writes
   the headers for allowed origins and answers their preflights with 204.
2. ``allowedHostsMiddleware`` (with ``allowedHost`` and ``isLocalIP``): only when the
   server listens on a loopback address, a request whose ``Host`` is not local gets 403
   (DNS rebinding: a page on ``evil.example`` resolved to 127.0.0.1 must not reach the
   API). ``HostCheck`` is that middleware.

``AllowBrowserExtensions`` in Ollama's configuration does not allow extension origins by
itself: in gin-contrib/cors v1.7.2 it only lets ``AllowOrigins`` name ``chrome-extension://``
and the like without a wildcard. An extension is allowed by ``OLLAMA_ORIGINS``, as
Ollama's FAQ says (``OLLAMA_ORIGINS=chrome-extension://*``).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket

import psutil
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "ALLOWED_HEADERS",
    "CORS_MAX_AGE",
    "CORS_METHODS",
    "HostCheck",
    "OllamaCORS",
    "allowed_host",
    "cors_origin",
    "is_local_address",
    "listens_on_loopback",
    "origin_regex",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ollama's default origins (envconfig.AllowedOrigins): local pages on any port, and the
# shells of desktop apps and editor extensions.
LOCAL_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
SCHEMES = ("http", "https")
APP_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")
# Request headers a cross-origin page may send: Ollama's AllowHeaders (server/routes.go),
# then those the gateway's own features read (the Anthropic SDK's key and version, request
# ids, the priority header).
ALLOWED_HEADERS = [
    "Authorization",
    "Content-Type",
    "User-Agent",
    "Accept",
    "X-Requested-With",
    "OpenAI-Beta",
    "x-stainless-arch",
    "x-stainless-async",
    "x-stainless-custom-poll-interval",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-poll-helper",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    # The Anthropic SDK sends it from a browser (dangerouslyAllowBrowser).
    "anthropic-dangerous-direct-browser-access",
    "X-Request-Id",
    "X-Oshepherd-Priority",
]
# gin-contrib/cors's DefaultConfig: these methods, preflights cached for 12 hours.
CORS_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
CORS_MAX_AGE = 12 * 3600
# Top-level domains that only ever name this machine or its network (allowedHost).
LOCAL_TLDS = ("localhost", "local", "internal")
# netip.Addr.IsPrivate: RFC 1918 and RFC 4193 (Python's is_private covers far more).
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def origin_regex(extra: str) -> str:
    """Ollama's default origins plus ``extra`` (``OLLAMA_ORIGINS``: comma-separated, where
    ``*`` matches anything, as gin-contrib/cors's wildcards do), as one regex to match a
    whole ``Origin``."""
    patterns = [origin.strip() for origin in extra.split(",") if origin.strip()]
    for host in LOCAL_ORIGIN_HOSTS:
        patterns += [f"{scheme}://{host}{port}" for scheme in SCHEMES for port in ("", ":*")]
    patterns += [f"{scheme}://*" for scheme in APP_SCHEMES]
    return "|".join(".*".join(map(re.escape, pattern.split("*"))) for pattern in patterns)


def _forbidden() -> Response:
    """gin's ``AbortWithStatus(403)``: the status alone, an empty body."""
    return Response(status_code=403)


def cors_origin(headers: Headers) -> str | None:
    """The ``Origin`` of a CORS request, or None for a request that is none: without
    ``Origin``, or from the page's own server (fetch sends ``Origin`` on a POST), as
    gin-contrib/cors's ``applyCors`` tells them apart."""
    origin = headers.get("origin", "")
    if not origin:
        return None
    host = headers.get("host", "")
    if origin in (f"http://{host}", f"https://{host}"):
        return None
    return origin


class OllamaCORS(CORSMiddleware):
    """gin-contrib/cors's ``applyCors`` on Starlette's CORS middleware. A request that is
    no CORS request (``cors_origin``) passes with no CORS header at all, not even ``Vary:
    Origin``, and no wrapper around its answer. One from an origin that is not allowed
    gets 403 with an empty body, before anything runs. The rest get Starlette's headers,
    and a preflight gin-contrib/cors's answer: 204 and no body; as in gin-contrib/cors,
    the browser, not the server, compares the requested method and headers with the
    lists granted."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = cors_origin(Headers(scope=scope)) if scope["type"] == "http" else None
        if origin is None:
            await self.app(scope, receive, send)
        elif not self.is_allowed_origin(origin):
            await _forbidden()(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        headers = {
            name: value
            for name, value in answer.headers.items()
            if name not in ("content-length", "content-type")
        }
        return Response(status_code=204, headers=headers)


class HostCheck:
    """Ollama's ``allowedHostsMiddleware`` for an API on a loopback address: a request
    whose ``Host`` is not local gets 403 (empty body) and nothing runs; an ``OPTIONS`` to a
    local host name gets 204. ``loopback`` is whether the API listens on loopback
    (``listens_on_loopback``); when it does not, every ``Host`` passes."""

    def __init__(self, app: ASGIApp, *, loopback: bool) -> None:
        self.app = app
        self._loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._loopback:
            await self.app(scope, receive, send)
            return
        host = _hostname(Headers(scope=scope).get("host", ""))
        if is_local_address(host):
            await self.app(scope, receive, send)
        elif not allowed_host(host):
            await _forbidden()(scope, receive, send)
        elif scope["method"] == "OPTIONS":
            await Response(status_code=204)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    """The host of a ``Host`` header, as Go's ``net.SplitHostPort`` finds it, else the
    whole header (``localhost`` has no port; ``::1`` has too many colons)."""
    if host.startswith("["):
        inside, bracket, rest = host[1:].partition("]")
        return inside if bracket and rest.startswith(":") else host
    return host.partition(":")[0] if host.count(":") == 1 else host


@functools.lru_cache(maxsize=1024)  # parsing is most of the host check; Hosts repeat
def _address(text: str) -> IPAddress | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_local_address(host: str) -> bool:
    """Whether ``host`` is an IP address a local client may use: loopback, private,
    unspecified, or one of this machine's (``allowedHostsMiddleware``, ``isLocalIP``)."""
    address = _address(host)
    if address is None:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    if any(address in network for network in PRIVATE_NETWORKS):
        return True
    return address in _machine_addresses()


def _machine_addresses() -> set[IPAddress]:
    """The addresses of this machine's interfaces, looked up now: they may change."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                address = _address(entry.address.partition("%")[0])
                if address is not None:
                    found.add(address)
    return found


def allowed_host(host: str) -> bool:
    """Whether a ``Host`` name (no port) names this machine or its network: empty,
    ``localhost``, this machine's hostname, or a ``.localhost``, ``.local`` or
    ``.internal`` name (``allowedHost``, case-insensitive)."""
    host = host.lower()
    if host in ("", "localhost", socket.gethostname().lower()):
        return True
    return host.endswith(tuple(f".{tld}" for tld in LOCAL_TLDS))


def listens_on_loopback(host: str) -> bool:
    """Whether an API told to listen on ``host`` (``HOST``: an address or a name) binds a
    loopback address, as Ollama asks of its listener's address. A name is resolved as the
    server resolves it when it binds; one that does not resolve counts as loopback (the
    safe side); an empty ``host`` binds every interface."""
    if not host:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        resolved = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except OSError:
        return True
    address = _address(str(resolved[0][4][0]).partition("%")[0])
    return address is not None and address.is_loopback
