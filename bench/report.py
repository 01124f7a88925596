"""The results: one row per figure, printed as a table, written as Markdown, JSON and a plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from bench.plots import plot

__all__ = ["Row", "Target", "markdown", "table", "write"]

Kind = Literal["added", "ratio", "speedup", "value"]


@dataclass(frozen=True)
class Target:
    """A bound on a row's compared value (added time, ratio) or on its gateway value."""

    op: Literal["<=", ">="]
    bound: float
    on: Literal["compared", "gateway"] = "compared"

    def met(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound


@dataclass
class Row:
    """One figure: what the direct path and the gateway measured, and how they compare."""

    figure: str
    label: str
    unit: str
    direct: float | None
    gateway: float | None
    kind: Kind = "value"
    target: Target | None = None
    errors: int = 0
    notes: list[str] = field(default_factory=list)
    workers: int | None = None  # the N of a scaling row

    @property
    def compared(self) -> float | None:
        """Gateway minus direct (added), gateway over direct (ratio), or direct over gateway
        (speed-up, where ``direct`` holds the baseline time)."""
        if self.direct is None or self.gateway is None or self.kind == "value":
            return None
        if self.kind == "added":
            return self.gateway - self.direct
        if self.kind == "ratio":
            return self.gateway / self.direct if self.direct else None
        return self.direct / self.gateway if self.gateway else None

    @property
    def passed(self) -> bool | None:
        """None when the row has no target; an error anywhere fails it."""
        if self.errors:
            return False
        if self.target is None:
            return None
        value = self.gateway if self.target.on == "gateway" else self.compared
        return value is not None and self.target.met(value)


HEADER = ("figure", "direct", "gateway", "added / ratio", "target", "result")


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if value == int(value):
        return f"{int(value):,} {unit}".strip()
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:,.{digits}f} {unit}".strip()


def _compared(row: Row) -> str:
    value = row.compared
    if value is None:
        return "—"
    if row.kind == "added":
        return ("+" if value >= 0 else "") + _num(value, row.unit)
    return f"{value:.2f}×" + (" vs N=1" if row.kind == "speedup" else "")


def _target(row: Row) -> str:
    if row.target is None:
        return "—"
    op = "≤" if row.target.op == "<=" else "≥"
    if row.target.on == "gateway":
        return f"{op} {_num(row.target.bound, row.unit)}"
    if row.kind == "added":
        return f"added {op} {_num(row.target.bound, row.unit)}"
    return f"{op} {row.target.bound:g}×"


def _result(row: Row) -> str:
    if row.errors:
        return f"FAIL ({row.errors} errors)"
    return {True: "pass", False: "FAIL", None: "—"}[row.passed]


def cells(row: Row) -> tuple[str, ...]:
    return (
        f"{row.figure}. {row.label}",
        _num(row.direct, row.unit),
        _num(row.gateway, row.unit),
        _compared(row),
        _target(row),
        _result(row),
    )


def _notes(rows: list[Row]) -> list[str]:
    return [f"{row.figure}. {note}" for row in rows for note in row.notes]


def table(rows: list[Row]) -> str:
    """Aligned plain text for the terminal, notes below."""
    grid = [HEADER, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in grid
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *_notes(rows)])


def markdown(rows: list[Row], title: str) -> str:
    grid = [HEADER, *(cells(r) for r in rows)]
    lines = ["| " + " | ".join(line) + " |" for line in grid]
    lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
    notes = [f"- {n}" for n in _notes(rows)]
    return "\n".join([f"### {title}", "", *lines, "", *notes, ""])


def write(rows: list[Row], out: Path, title: str) -> list[Path]:
    """results.md, results.json and bench.png in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    md, raw, png = out / "results.md", out / "results.json", out / "bench.png"
    md.write_text(markdown(rows, title))
    data = [{**asdict(r), "compared": r.compared, "passed": r.passed} for r in rows]
    raw.write_text(json.dumps({"title": title, "rows": data}, indent=2))
    plot(rows, png, title)
    return [md, raw, png]
