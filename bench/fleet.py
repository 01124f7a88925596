"""The bench's processes: one embedded Redis, and per figure a fleet
(``oshepherd.testing.fleet``) of stand-in processes, workers and an API on a Redis database
of its own.

Everything is a real process started the way a user would start it (``oshepherd.stack``),
and everything is stopped when the fleet or the lab closes, also on Ctrl-C or an error.
"""

from __future__ import annotations

import resource
from typing import IO, Any, Self

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet, fresh_database

__all__ = ["Lab", "raise_open_file_limit"]

# Defaults otherwise (what a user runs); only the drains are short, so that a bench stopped
# by Ctrl-C or an error does not wait on them.
API_SETTINGS: dict[str, Any] = {"shutdown_grace": 2}
WORKER_SETTINGS: dict[str, Any] = {"shutdown_timeout": 5}


def raise_open_file_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one: the processes started later inherit it,
    and 1,000 streams cost each of the client, the API and the stand-in 1,000 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Lab:
    """The Redis every fleet of one bench run shares, each fleet on its own database."""

    def __init__(self, log_file: IO[bytes]) -> None:
        self._log = log_file
        self._redis = EmbeddedRedis()
        self._separate: list[EmbeddedRedis] = []

    def __enter__(self) -> Self:
        self._redis.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._separate:
            server.close()
        self._redis.close()

    def fleet(self) -> Fleet:
        """A new fleet on a freshly emptied database, with the bench's settings."""
        database = fresh_database(self._redis)
        return Fleet(database, self._log, api=API_SETTINGS, worker=WORKER_SETTINGS)

    def separate_fleet(self) -> Fleet:
        """A new fleet on a Redis of its own (closed with the lab): its commands and CPU
        are the fleet's alone."""
        server = EmbeddedRedis()
        self._separate.append(server)
        server.start()
        return Fleet(server.url, self._log, api=API_SETTINGS, worker=WORKER_SETTINGS)
