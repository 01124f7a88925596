"""API keys: the record, its checks, and the one store that the CLI and the HTTP admin routes
share (the API runs it in a thread).

A key's secret is ``osk-`` plus 43 URL-safe characters (``secrets.token_urlsafe(32)``); it is
shown once, at creation, and only its SHA-256 is stored, in the hash ``protocol.KEYS``
(hex digest -> ``ApiKey`` JSON). Every change INCRs ``protocol.KEYS_VERSION`` in the same
transaction; each API replica polls it and reloads its table (``oshepherd.api.auth``). The
ids of the keys are the fleet's tenants (``protocol.TENANTS``), which the workers read.

Bad input (a scope that is not one, a priority that is not a level, a limit that is not a
positive integer up to ``LIMIT_MAX``, a CIDR or a model glob that does not parse) raises
``InvalidKey``, whose message names the field; an id or name that matches no key, or a name
shared by several, raises ``UnknownKey``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from fnmatch import fnmatchcase
from typing import Any

import orjson
import redis

from oshepherd.models import normalize
from oshepherd.protocol import KEYS, KEYS_VERSION, TENANTS

__all__ = [
    "LEVELS",
    "LIMITS",
    "LIMIT_MAX",
    "SCOPES",
    "SECRET_PREFIX",
    "ApiKey",
    "InvalidKey",
    "KeyStore",
    "UnknownKey",
    "checked",
    "digest",
    "in_networks",
    "looks_like_secret",
    "parse_networks",
    "parse_table",
    "public",
]

SECRET_PREFIX = "osk-"
SCOPES = ("user", "admin")
LEVELS = ("high", "normal", "low")  # highest first
LIMITS = ("max_concurrent", "rpm", "tokens_per_day")
LIMIT_MAX = 2**53 - 1  # a limit's largest value: exact in JSON and in Redis's Lua numbers
ID_BYTES = 6  # 12 hex digits
NAME_MAX = 100
# token_urlsafe(32): 43 characters of the URL-safe base64 alphabet.
_SECRET = re.compile(rf"{SECRET_PREFIX}[A-Za-z0-9_-]{{43}}")
_GLOB_CHARS = frozenset("*?[")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class InvalidKey(ValueError):
    """A field of a key to create or update is not valid; the message names it."""


class UnknownKey(LookupError):
    """No key has that id or name, or several share that name."""


@dataclass(frozen=True)
class ApiKey:
    """One key (never its secret): ``id`` (12 hex digits) is the tenant in queues and usage;
    ``models`` are fnmatch globs on normalized names (empty: every model); ``allow_ips``
    CIDRs (empty: any address); limits are None when unlimited; ``created`` epoch seconds."""

    id: str
    name: str
    scope: str = "user"
    models: tuple[str, ...] = ()
    priority: str = "normal"
    max_concurrent: int | None = None
    rpm: int | None = None
    tokens_per_day: int | None = None
    allow_ips: tuple[str, ...] = ()
    created: float = 0.0
    _networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks = tuple(ipaddress.ip_network(cidr) for cidr in self.allow_ips)
        object.__setattr__(self, "_networks", networks)

    def allows_model(self, model: str) -> bool:
        """Whether the key may use ``model`` (a normalized name)."""
        return not self.models or any(fnmatchcase(model, glob) for glob in self.models)

    def allows_address(self, address: str) -> bool:
        """Whether a client at ``address`` (an IP address) may use the key."""
        return not self._networks or in_networks(address, self._networks)

    def to_json(self) -> bytes:
        return orjson.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.init})

    @classmethod
    def from_json(cls, raw: bytes | str) -> ApiKey:
        """Raises ``InvalidKey`` for a record that is not a key's."""
        try:
            data = orjson.loads(raw)
            known = {f.name for f in fields(cls) if f.init}
            values = {k: v for k, v in data.items() if k in known}
            for name in ("models", "allow_ips"):
                values[name] = tuple(values.get(name, ()))
            return cls(**values)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise InvalidKey(f"not a key record: {exc}") from exc


def digest(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_secret(text: str) -> bool:
    """Whether ``text`` has the form of a key's secret (``osk-`` + 43 characters)."""
    return _SECRET.fullmatch(text) is not None


def in_networks(address: str, networks: Iterable[Network]) -> bool:
    """Whether ``address`` (an IP address, IPv4-mapped IPv6 read as IPv4) is in one of
    ``networks``; False for text that is no address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def parse_networks(value: str | Iterable[str], what: str = "allow_ips") -> tuple[str, ...]:
    """CIDRs (a comma-separated string or a list) as normalized strings (``10.0.0.0/8``; an
    address alone is its /32 or /128). Raises ``InvalidKey`` naming ``what``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidKey(f"invalid value for '{what}': {item!r} is not a CIDR string")
        if not item.strip():
            continue
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError as exc:
            raise InvalidKey(f"invalid value for '{what}': {exc}") from exc
    return tuple(out)


def parse_table(raw: Mapping[bytes, bytes]) -> dict[str, ApiKey]:
    """``HGETALL KEYS`` as digest -> key; a record that does not parse is left out."""
    table = {}
    for hashed, record in raw.items():
        try:
            table[hashed.decode()] = ApiKey.from_json(record)
        except (InvalidKey, UnicodeDecodeError):
            continue
    return table


def checked(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a key to create or update, validated and normalized: ``name``,
    ``scope``, ``models`` (globs: a comma-separated string or a list), ``priority``, the
    ``LIMITS`` (a positive integer, or None for no limit) and ``allow_ips`` (CIDRs). Only
    the fields given are returned. Raises ``InvalidKey`` for an unknown field or a bad
    value."""
    unknown = set(values) - {"name", "scope", "models", "priority", "allow_ips", *LIMITS}
    if unknown:
        raise InvalidKey(f"unknown field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        out[name] = _CHECKS.get(name, _limit)(name, value)
    return out


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > NAME_MAX:
        raise InvalidKey(f"invalid value for 'name': expected 1 to {NAME_MAX} characters")
    return value.strip()


def _choice(options: tuple[str, ...]) -> Any:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise InvalidKey(f"invalid value for '{name}': {value!r} is not one of {options}")
        return str(value)

    return check


def _limit(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMIT_MAX:
        raise InvalidKey(
            f"invalid value for '{name}': {value!r} is not a positive integer up to {LIMIT_MAX}"
        )
    return value


def _models(name: str, value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise InvalidKey(f"invalid value for '{name}': expected a list of model globs")
    return tuple(_glob(item) for item in items if not isinstance(item, str) or item.strip())


def _glob(glob: Any) -> str:
    """A model glob, lower case; one without wildcards is a name, normalized (``llama3`` is
    ``llama3:latest``)."""
    if not isinstance(glob, str) or any(ch.isspace() or ch in ",|" for ch in glob.strip()):
        raise InvalidKey(f"invalid value for 'models': {glob!r} is not a model glob")
    glob = glob.strip().lower()
    if glob.count("[") != glob.count("]") or "[]" in glob:
        raise InvalidKey(f"invalid value for 'models': {glob!r} has an unclosed '['")
    return glob if _GLOB_CHARS & set(glob) else normalize(glob)


def _allow_ips(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, str | list | tuple):
        raise InvalidKey(f"invalid value for '{name}': expected a list of CIDRs")
    return parse_networks(value, name)


_CHECKS = {
    "name": _name,
    "scope": _choice(SCOPES),
    "priority": _choice(LEVELS),
    "models": _models,
    "allow_ips": _allow_ips,
}


class KeyStore:
    """The keys in Redis (a synchronous client: the CLI's, or the API's in a thread).
    Redis errors propagate as redis-py's."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def create(self, values: Mapping[str, Any]) -> tuple[str, ApiKey]:
        """A new key from ``values`` (``checked``'s fields; ``name`` required): its secret,
        to show once, and its record."""
        given = checked(values)
        if "name" not in given:
            raise InvalidKey("a key needs a name")
        key = ApiKey(id=secrets.token_hex(ID_BYTES), created=time.time(), **given)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(KEYS, digest(secret), key.to_json())
            pipe.sadd(TENANTS, key.id)
            pipe.incr(KEYS_VERSION)
            pipe.execute()
        return secret, key

    def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first."""
        table = parse_table(self._redis.hgetall(KEYS))  # type: ignore[arg-type]
        return sorted(table.values(), key=lambda k: (k.created, k.id))

    def revoke(self, ref: str) -> ApiKey:
        """Delete the key whose id (or unique name) is ``ref``; its record."""
        return self._change(ref, None)

    def update(self, ref: str, values: Mapping[str, Any]) -> ApiKey:
        """Change the fields of ``values`` (``checked``'s) on the key ``ref``; the new record."""
        changes = checked(values)
        updated = self._change(ref, changes)
        assert updated is not None
        return updated

    def _change(self, ref: str, changes: dict[str, Any] | None) -> ApiKey:
        """Replace (or, with None, delete) the key ``ref`` atomically (WATCH on the hash)."""
        result: list[ApiKey] = []

        def apply(pipe: Any) -> None:
            hashed, key = _find(parse_table(pipe.hgetall(KEYS)), ref)
            pipe.multi()
            if changes is None:
                pipe.hdel(KEYS, hashed)
                pipe.srem(TENANTS, key.id)
            else:
                key = replace(key, **changes)
                pipe.hset(KEYS, hashed, key.to_json())
            pipe.incr(KEYS_VERSION)
            result[:] = [key]

        self._redis.transaction(apply, KEYS)
        return result[0]


def _find(table: dict[str, ApiKey], ref: str) -> tuple[str, ApiKey]:
    """The entry of the key whose id is ``ref``, else whose name is (if only one's is)."""
    for hashed, key in table.items():
        if key.id == ref:
            return hashed, key
    named = [(hashed, key) for hashed, key in table.items() if key.name == ref]
    if len(named) > 1:
        raise UnknownKey(f"{len(named)} keys are named '{ref}'; give the key's id")
    if not named:
        raise UnknownKey(f"no key has the id or name '{ref}'")
    return named[0]


def public(key: ApiKey) -> dict[str, Any]:
    """The key's record as JSON-ready data (what ``keys list --json`` and the HTTP admin
    routes show): every field, lists for the tuples."""
    data = asdict(key)
    data.pop("_networks", None)
    data["models"] = list(key.models)
    data["allow_ips"] = list(key.allow_ips)
    return data
