"""Ollama's keep_alive durations, read as Ollama's api.Duration and Go's time.ParseDuration."""

from __future__ import annotations

import math
from typing import Any

import pytest

from oshepherd import durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (0.0, 0.0),
        (1e-10, 0.0),  # below a nanosecond: Go truncates it to zero
        (300, 300.0),
        (1.5, 1.5),
        (-1, math.inf),
        ("0", 0.0),
        ("+0", 0.0),
        ("-0", 0.0),
        ("0s", 0.0),
        ("0m", 0.0),
        ("0h0m0s", 0.0),
        ("0.0s", 0.0),
        ("-0s", 0.0),
        ("0.5ns", 0.0),
        ("1ns", 1e-9),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("2µs", 2e-6),
        ("2μs", 2e-6),
        ("2us", 2e-6),
        ("10ms", 0.01),
        ("-1s", math.inf),
        ("-5m", math.inf),
        (1e308, math.inf),  # past int64 nanoseconds, Go's conversion goes negative: forever
        (10**30, math.inf),
        ("2562047h", 2562047 * 3600.0),  # within int64 nanoseconds
    ],
)
def test_seconds_as_ollama_reads_them(value: Any, seconds: float) -> None:
    assert durations.seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "s", "5", "1x", ".s", "5m3", "abc", "1h 2m", True, [], {}, "2562048h", "9" * 400 + "s"],
)
def test_what_ollama_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match=r"invalid duration|Unsupported type"):
        durations.seconds(value)


@pytest.mark.parametrize(
    ("value", "zero"),
    [
        (0, True),
        ("0", True),
        ("0s", True),
        ("0m", True),
        (0.0, True),
        (None, False),  # absent: the model's default keep_alive
        (-1, False),
        ("5m", False),
        ("1ns", False),
        ("nonsense", False),  # Ollama answers 400: no unload
        (False, False),
    ],
)
def test_is_zero(value: Any, zero: bool) -> None:
    assert durations.is_zero(value) is zero
