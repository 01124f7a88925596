"""Who is calling: API keys, scopes, priorities and the client-address allowlists.

``Authenticate`` is a pure ASGI middleware inside Ollama's origin, CORS and host checks (so
its errors carry CORS headers and preflights never need a key). For each HTTP request it
resolves the ``Caller`` and sets it for the request (``caller()``); the dispatcher reads it
when it queues a job.

* Keys are off until the first key exists: a fleet without keys behaves as Ollama does.
  Once one exists, every route needs a key except ``GET|HEAD /``, ``/api/version``, the
  probes ``/healthz`` and ``/readyz``, and the dashboard's page and assets (``/oshepherd/``,
  ``/oshepherd/assets/*``, no data in them); ``/metrics`` and ``/metrics/fleet`` need an
  admin key or ``Authorization: Bearer <METRICS_TOKEN>`` (docs/metrics.md).
* A key comes as ``Authorization: Bearer <key>`` (ollama-python and ollama-js through
  ``OLLAMA_API_KEY``, the OpenAI SDK, Claude Code's ``ANTHROPIC_AUTH_TOKEN``) or as
  ``x-api-key: <key>`` (the Anthropic SDK).
* Scopes: ``user`` may run inference, list and show; ``admin`` also pull, push, create, copy,
  delete, blobs and ``/oshepherd/*`` (the fleet's admin routes, key management).
* ``X-Oshepherd-Priority: high|normal|low`` asks for a level, capped at the key's own.
* ``ALLOW_IPS`` (every request) and a key's ``allow_ips`` admit client addresses. The
  address is the socket peer's, or the one uvicorn's proxy-headers support took from
  ``X-Forwarded-For`` when the peer is one of ``TRUSTED_PROXIES``.

Errors, each in the route's shape with a ``code``: 401 ``missing_api_key`` /
``invalid_api_key``, 403 ``insufficient_scope`` / ``model_not_allowed`` / ``ip_not_allowed``,
400 ``invalid_priority``, and 503 ``keys_unavailable`` until the key table has first been
read from Redis (fail closed).

``KeyTable`` is each replica's copy of the keys: it polls ``KEYS_VERSION`` every quarter of
a second and reloads on a change, so a revocation reaches every replica within a second, and
a request costs one dict lookup, no Redis round trip. If Redis goes away, the last table
stays in force.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from oshepherd.api.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    Unauthorized,
    Unavailable,
    error_response,
)
from oshepherd.keys import (
    LEVELS,
    SECRET_PREFIX,
    ApiKey,
    digest,
    in_networks,
    looks_like_secret,
    parse_table,
)
from oshepherd.protocol import KEYS, KEYS_VERSION
from oshepherd.usage import Usage

if TYPE_CHECKING:
    from oshepherd.api.limits import Admission, Limiter

__all__ = [
    "PRIORITY_HEADER",
    "Authenticate",
    "Caller",
    "KeyTable",
    "caller",
    "check_model",
    "may_use",
]

log = logging.getLogger(__name__)

PRIORITY_HEADER = "X-Oshepherd-Priority"
POLL_INTERVAL = 0.25  # seconds between two looks at KEYS_VERSION
# What needs no key: Ollama's liveness and version probes, the load balancers' (GET and
# HEAD only).
OPEN_PATHS = frozenset({"/", "/api/version", "/healthz", "/readyz", "/oshepherd", "/oshepherd/"})
# The dashboard's page and assets hold no data (its fetches need an admin key): docs/dashboard.md.
OPEN_PREFIXES = ("/oshepherd/assets/",)
# Prometheus's scrapes: an admin key, or the ``METRICS_TOKEN`` bearer.
METRICS_PATHS = frozenset({"/metrics", "/metrics/fleet"})
OPEN_METHODS = frozenset({"GET", "HEAD"})
# What needs an admin key (with or without a trailing '/').
ADMIN_PATHS = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
ADMIN_PREFIXES = ("/api/blobs/", "/oshepherd/")
ACCEPTED = "send it as 'Authorization: Bearer <key>' or as 'x-api-key: <key>'"
Headers = Iterable[tuple[bytes, bytes]]  # an ASGI scope's
_RANK = {level: rank for rank, level in enumerate(LEVELS)}


@dataclass
class Caller:
    """The caller of the current request: its ``key`` (None when keys are off), ``tenant``
    (the key's id, "" when keys are off), ``priority`` (a level of ``keys.LEVELS``) and
    ``client`` address; ``usage``, what its jobs used (``JobStream`` adds to it);
    ``admission``, its limits on an inference route (``Dispatcher`` queues its first job
    with it)."""

    key: ApiKey | None = None
    tenant: str = ""
    priority: str = "normal"
    client: str = ""
    usage: Usage = field(default_factory=Usage)
    admission: Admission | None = None


_NOBODY = Caller()
_CALLER: ContextVar[Caller] = ContextVar("oshepherd_caller", default=_NOBODY)


def caller() -> Caller:
    """The current request's caller (outside a request: no key, tenant "", "normal")."""
    return _CALLER.get()


def may_use(model: str) -> bool:
    """Whether the current caller may use ``model`` (a normalized name)."""
    key = _CALLER.get().key
    return key is None or key.allows_model(model)


def check_model(model: str) -> None:
    """Raise ``Forbidden`` (403 ``model_not_allowed``) unless the caller may use ``model``
    (normalized)."""
    if not may_use(model):
        raise Forbidden(f"this API key may not use model '{model}'", code="model_not_allowed")


class KeyTable:
    """One replica's copy of the keys, digest -> ``ApiKey``; ``loaded`` once read from Redis."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKey] = {}
        self.loaded = False
        self._version: bytes | None = None

    async def run_forever(self, redis: Redis, interval: float = POLL_INTERVAL) -> None:
        """Reload whenever ``KEYS_VERSION`` changes; a Redis error keeps the last table."""
        while True:
            try:
                await self.refresh(redis)
            except RedisError as exc:
                log.warning("could not read the API keys: %r", exc)
            await asyncio.sleep(interval)

    async def refresh(self, redis: Redis) -> None:
        """Reload the table if its version changed (or was never read); raises RedisError."""
        version = await redis.get(KEYS_VERSION)
        if self.loaded and version == self._version:
            return
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(KEYS_VERSION)
            pipe.hgetall(KEYS)
            version, raw = await pipe.execute()
        self.keys = parse_table(raw)
        self._version = version
        self.loaded = True

    def lookup(self, secret: str) -> ApiKey | None:
        return self.keys.get(digest(secret))


class Authenticate:
    """The ASGI middleware that sets ``caller()`` for each HTTP request, or answers its
    error (see the module). ``allow_ips``: the global allowlist (empty: any address).
    ``limiter`` admits the requests to inference routes (``oshepherd.api.limits``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        table: KeyTable,
        allow_ips: Iterable[str],
        limiter: Limiter | None = None,
        metrics_token: str = "",
    ) -> None:
        self.app = app
        self._table = table
        self._limiter = limiter
        # Stripped as the bearer is: a token read from a file (a Kubernetes secret) ends in
        # a newline that no Authorization header can carry.
        self._metrics_token = metrics_token.strip().encode()
        self._allow_ips = tuple(ipaddress.ip_network(cidr) for cidr in allow_ips)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            who = self._resolve(scope)
        except ApiError as exc:
            await error_response(scope["path"], exc)(scope, receive, send)
            return
        token = _CALLER.set(who)
        try:
            limiter = self._limiter
            if limiter is None or not limiter.applies(scope["method"], scope["path"]):
                await self.app(scope, receive, send)
                return
            who.admission = admission = limiter.admission(who)  # checked by its first job
            try:
                await self.app(scope, receive, send)
            finally:
                admission.close()
        finally:
            _CALLER.reset(token)

    def _resolve(self, scope: Scope) -> Caller:
        """The caller of the request ``scope``; raises the ``ApiError`` to answer."""
        client = scope["client"][0] if scope.get("client") else ""
        if _is_open(scope):
            return Caller(None, "", "normal", client)
        if self._allow_ips and not in_networks(client, self._allow_ips):
            raise Forbidden(f"client address {client} is not allowed", code="ip_not_allowed")
        bearer = api_key = asked = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                bearer = value
            elif name == b"x-api-key":
                api_key = value
            elif name == b"x-oshepherd-priority":
                asked = value
        priority = _priority(asked)
        table = self._table
        if not table.keys:
            if not table.loaded:
                raise _not_loaded()
            return Caller(None, "", priority or "normal", client)
        if scope["path"] in METRICS_PATHS and self._is_metrics_token(bearer):
            return Caller(None, "", "normal", client)
        key = _key(table, bearer, api_key, scope["headers"])
        if _needs_admin(scope["path"]) and key.scope != "admin":
            raise Forbidden("this route needs an admin API key", code="insufficient_scope")
        if not key.allows_address(client):
            raise Forbidden(
                f"client address {client} is not allowed for this API key", code="ip_not_allowed"
            )
        if priority is None or _RANK[priority] < _RANK[key.priority]:
            priority = key.priority
        return Caller(key, key.id, priority, client)

    def _is_metrics_token(self, bearer: bytes | None) -> bool:
        """Whether ``Authorization`` is ``Bearer <METRICS_TOKEN>`` (compared in constant time)."""
        if not self._metrics_token or bearer is None:
            return False
        scheme, _, secret = bearer.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            secret.strip(), self._metrics_token
        )


def _priority(value: bytes | None) -> str | None:
    if value is None:
        return None
    level = value.decode("latin-1").strip().lower()
    if level not in _RANK:
        raise BadRequest(
            f"invalid {PRIORITY_HEADER} {level!r}: expected one of high, normal, low",
            code="invalid_priority",
        )
    return level


def _is_open(scope: Scope) -> bool:
    """A route that needs no key, or a CORS preflight (``OPTIONS`` asking for a method)."""
    method = scope["method"]
    if method == "OPTIONS":
        return any(name == b"access-control-request-method" for name, _ in scope["headers"])
    path = scope["path"]
    return method in OPEN_METHODS and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))


def _needs_admin(path: str) -> bool:
    return (
        path.rstrip("/") in ADMIN_PATHS or path in METRICS_PATHS or path.startswith(ADMIN_PREFIXES)
    )


def _key(table: KeyTable, bearer: bytes | None, api_key: bytes | None, headers: Headers) -> ApiKey:
    """The key the request presents; ``Unauthorized`` saying what is wrong if none."""
    candidates = []
    if bearer is not None:
        scheme, _, secret = bearer.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "basic":
            raise Unauthorized(
                f"Basic authentication is not supported: {ACCEPTED}", code="invalid_api_key"
            )
        if scheme.lower() != "bearer":
            raise Unauthorized(
                f"the Authorization header is not 'Bearer <key>': {ACCEPTED}",
                code="invalid_api_key",
            )
        candidates.append(secret.strip())
    if api_key is not None:
        candidates.append(api_key.decode("latin-1").strip())
    for secret in candidates:
        key = table.lookup(secret)
        if key is not None:
            return key
    if not candidates:
        raise Unauthorized(_missing(headers), code="missing_api_key")
    if not all(looks_like_secret(secret) for secret in candidates):
        raise Unauthorized(
            f"malformed API key: keys have the form {SECRET_PREFIX}<43 characters>",
            code="invalid_api_key",
        )
    raise Unauthorized("invalid API key", code="invalid_api_key")


def _missing(headers: Headers) -> str:
    """Why no key was found: none given, or one in a header the gateway does not read."""
    for name, value in headers:
        if b"osk-" in value:
            return f"the API key was sent in the header '{name.decode('latin-1')}': {ACCEPTED}"
    return f"this server needs an API key: {ACCEPTED}"


def _not_loaded() -> ApiError:
    error = Unavailable("the gateway has not read its API keys from Redis yet")
    error.code = "keys_unavailable"
    return error
