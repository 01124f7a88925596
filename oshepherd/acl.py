"""The Redis ACL of a worker: only what a worker does, built from ``protocol``'s names.

A worker's Redis user (docs/redis-acl.md) may take jobs off the queues (never push one),
read and write its registry entry, the cancel and started keys, the chunks of the uploads
aimed at it, and publish on reply channels; it may not read the API keys, the usage or the
limits, push on any list, pattern-subscribe, list keys or channels, or run admin commands.
The command set was found by running real workers (Celery, kombu, redis-py) as this user
through every kind of job and reading ``ACL LOG`` until it named no denial (tests/test_acl.py
keeps it so). Redis 6.2 has no selectors and no read/write key permissions: a key pattern
grants every allowed command on the keys it matches.
"""

from __future__ import annotations

import re

from kombu.transport.redis import Channel

from oshepherd.protocol import (
    CANCEL_CHANNEL,
    PRIORITY_STEPS,
    TENANTS,
    WORKERS_INDEX,
    blob_key,
    cancel_key,
    job_channel_pattern,
    model_queue,
    queue_key,
    started_key,
    worker_key,
    worker_queue,
    worker_stats_key,
)

__all__ = [
    "KOMBU_BINDINGS",
    "WORKER_COMMANDS",
    "aclfile_line",
    "quote",
    "setuser_command",
    "worker_rules",
]

# kombu's Redis transport keeps the bindings of an exchange in two sets (SADD as a worker
# declares its queues); Celery names each queue's exchange after the queue.
KOMBU_BINDINGS = (
    Channel.keyprefix_queue % ("",),
    Channel.keyprefix_binding_permanent % ("",),
)

# Every command a worker sends, by who sends it.
WORKER_COMMANDS: tuple[str, ...] = (
    # redis-py: PING checks an idle connection; at every connect it tries the two CLIENT
    # subcommands (Redis 7's and 8's) and goes on without them (granted, they fail as
    # unknown subcommands on 6.2 instead of filling ACL LOG)
    "ping",
    "client|setinfo",
    "client|maint_notifications",
    # a database other than 0 in the URL (an ACL is not per database: the same key
    # patterns hold in each)
    "select",
    # kombu: take a job (BRPOP over the queues, highest priority first); declare a queue
    # (SADD its binding, MULTI/LLEN/EXEC its size)
    "brpop",
    "sadd",
    "multi",
    "llen",
    "exec",
    # the registry: the entry with its TTL, the index of live workers, the tenants
    "set",
    "del",
    "zadd",
    "zrem",
    "zremrangebyscore",
    "smembers",
    # a job: START_SCRIPT (GET the cancel key, SET the started key, PUBLISH the start;
    # redis-py runs a script by its SHA1 and loads it when Redis lacks it), frames on the
    # reply channel, the cancel channel; an upload's chunks (BLPOP; EXISTS: is its API
    # still there after a long wait) and its acks (PUBLISH)
    "evalsha",
    "script|load",
    "get",
    "publish",
    "subscribe",
    "blpop",
    "exists",
    # the cold queues' oldest jobs (OLDEST_SCRIPT)
    "lindex",
    # the tokens its jobs counted, with each heartbeat (oshepherd.worker.stats)
    "hincrby",
    "hset",
    "expire",
)


def _literal(name: str) -> str:
    """``name`` as a Redis glob matching only itself."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", name)


def worker_rules(worker_id: str | None = None) -> list[str]:
    """The ACL rules (after ``reset``, without ``on`` or a password) of a worker's user.

    With ``worker_id`` the user may only be that worker: its own registry entry and queue
    (each priority's list of it), not every worker's. Raises ``ValueError`` for an id with
    whitespace, which an ACL rule cannot hold.
    """
    if worker_id is not None and (not worker_id or re.search(r"\s", worker_id)):
        raise ValueError(f"a worker id for an ACL must be non-empty, without spaces: {worker_id!r}")
    models = f"{model_queue('')}*"  # every model's queues, of every tenant and priority
    if worker_id is None:
        own = f"{worker_queue('')}*"  # every worker's queue, each priority's list of it
        queues, exchanges = [models, own], [models, own]
        entry = f"{worker_key('')}*"
        stats = f"{worker_stats_key('')}*"
    else:
        own = _literal(worker_queue(worker_id))
        queues = [models, *(queue_key(own, step) for step in PRIORITY_STEPS)]
        exchanges = [models, own]
        entry = _literal(worker_key(worker_id))
        stats = _literal(worker_stats_key(worker_id))
    keys = [
        *queues,
        *(prefix + exchange for prefix in KOMBU_BINDINGS for exchange in exchanges),
        entry,
        stats,
        WORKERS_INDEX,
        TENANTS,
        f"{cancel_key('')}*",
        f"{started_key('')}*",
        f"{blob_key('')}*",
    ]
    channels = [job_channel_pattern("*"), CANCEL_CHANNEL]
    return [
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in WORKER_COMMANDS),
        *(f"~{key}" for key in keys),
        *(f"&{channel}" for channel in channels),
    ]


def setuser_command(user: str, password: str, worker_id: str | None = None) -> list[str]:
    """The arguments of ``ACL SETUSER`` creating (or resetting) a worker's user ``user``
    with ``password``. Raises ``ValueError`` for an empty user or password."""
    if not user or not password or re.search(r"\s", user):
        raise ValueError("a user needs a name without spaces and a password")
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", *worker_rules(worker_id)]


def aclfile_line(user: str, password: str, worker_id: str | None = None) -> str:
    """The same user as a line of a Redis ACL file (``aclfile``). Redis 6.2 splits those
    lines at spaces and reads no quotes, so the rules are written raw: a per-worker user's
    queue names hold kombu's two control bytes as they are. Raises ``ValueError`` for a
    password with whitespace, which such a line cannot hold."""
    args = ["user", *setuser_command(user, password, worker_id)[2:]]
    if any(re.search(r"\s", arg) for arg in args):
        raise ValueError("an ACL file cannot hold a password with spaces")
    return " ".join(args)


def quote(arg: str) -> str:
    """``arg`` as redis-cli and an ACL file read it (Redis's ``sdssplitargs``): bare when it
    is plain, else in double quotes with backslash escapes (the kombu priority separator
    is two control bytes)."""
    if re.fullmatch(r"[!#-&(-\[\]-~]+", arg):  # printable ASCII but for quotes and \\
        return arg
    escaped = "".join(
        "\\" + chr(b) if chr(b) in '"\\' else chr(b) if 0x20 <= b <= 0x7E else f"\\x{b:02x}"
        for b in arg.encode()
    )
    return f'"{escaped}"'
