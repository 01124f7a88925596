"""Ollama's durations (``api.Duration``, the type of ``keep_alive``), read as Ollama reads them.

A number is seconds, a string is Go's ``time.ParseDuration`` syntax (``"0"``, ``"5m"``,
``"1h30m"``, ``"-1s"``); a negative value means "forever". Source: Ollama's
``api/types.go`` (``Duration.UnmarshalJSON``) and Go's ``time/format.go``.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["is_zero", "seconds"]

NANOSECONDS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
MAX_NANOSECONDS = (1 << 63) - 1  # Go's time.Duration is an int64 of nanoseconds
# One component of a Go duration: digits, an optional fraction, a unit (anything up to
# the next digit or dot, as Go reads it).
_COMPONENT = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def seconds(value: Any) -> float:
    """``value`` (a JSON number or string) in seconds; ``math.inf`` for a negative one.

    Raises ``ValueError`` for what Ollama refuses with a 400: another type, or a string
    that is no Go duration.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, str):
        nanoseconds = _parse(value)
    elif value < 0 or not value * 1e9 <= MAX_NANOSECONDS:
        # Past int64, Go's float-to-Duration conversion gives a negative Duration: forever.
        return math.inf
    else:
        nanoseconds = int(value * 1e9)  # Go's float-to-Duration conversion truncates
    return math.inf if nanoseconds < 0 else nanoseconds / 1e9


def is_zero(value: Any) -> bool:
    """Whether ``value`` is a ``keep_alive`` of zero (unload at once); absent (None) or
    invalid is not."""
    if value is None:
        return False
    try:
        return seconds(value) == 0
    except ValueError:
        return False


def _parse(text: str) -> int:
    """Go's ``time.ParseDuration``, in nanoseconds; past int64 it is invalid, as in Go."""
    rest = text[1:] if text[:1] in ("-", "+") else text
    negative = text[:1] == "-"
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    total, pos = 0, 0
    while pos < len(rest):
        match = _COMPONENT.match(rest, pos)
        assert match is not None  # every group may be empty
        whole, fraction, unit = match.groups()
        if (not whole and not fraction) or unit not in NANOSECONDS:
            raise ValueError(f'time: invalid duration "{text}"')
        scale = NANOSECONDS[unit]
        total += int(whole or 0) * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)  # truncated, as Go does
        if total > MAX_NANOSECONDS:
            raise ValueError(f'time: invalid duration "{text}"')
        pos = match.end()
    return -total if negative else total
