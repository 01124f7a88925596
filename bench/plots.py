"""The plot's panels: each picks its rows and draws them on one matplotlib Axes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.report import Row

__all__ = ["plot"]

Pick = Callable[[list["Row"]], list["Row"]]
Draw = Callable[[Any, list["Row"]], None]
DIRECT, GATEWAY, TARGET = "#8c8c8c", "#1f77b4", "#d62728"


def _figures(*letters: str) -> Pick:
    return lambda rows: [r for r in rows if r.figure in letters and r.gateway is not None]


def _bars(ax: Any, rows: list[Row]) -> None:
    """Direct and gateway side by side, one pair per row (same unit)."""
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.direct or 0 for r in rows], 0.4, label="direct", color=DIRECT)
    ax.bar(
        [x + 0.2 for x in xs], [r.gateway or 0 for r in rows], 0.4, label="gateway", color=GATEWAY
    )
    ax.set_xticks(
        list(xs), [f"{r.figure}. {r.label}" for r in rows], rotation=35, ha="right", fontsize=7
    )
    ax.set_yscale("log")  # c=1 and c=64 differ by orders of magnitude
    ax.set_ylabel(f"{rows[0].unit} (log scale)")
    ax.legend(fontsize=8)


def _ratios(ax: Any, rows: list[Row]) -> None:
    ax.bar(range(len(rows)), [r.compared or 0 for r in rows], color=GATEWAY)
    ax.set_xticks(
        range(len(rows)),
        [f"{r.figure}. {r.label}" for r in rows],
        rotation=20,
        ha="right",
        fontsize=7,
    )
    ax.axhline(0.5, color=TARGET, linestyle="--", label="target ≥ 0.5")
    ax.axhline(1.0, color=DIRECT, linestyle=":", label="direct")
    ax.set_ylabel("gateway / direct")
    ax.legend(fontsize=8)


def _scaling(ax: Any, rows: list[Row]) -> None:
    ns = [r.workers or 0 for r in rows]
    ax.plot(ns, [r.compared or 0 for r in rows], "o-", color=GATEWAY, label="achieved / ideal")
    ax.axhline(0.95, color=TARGET, linestyle="--", label="target ≥ 0.95 at N=8")
    ax.set_xticks(ns)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("workers (N), each one request at a time, 200 ms")
    ax.legend(fontsize=8, loc="lower left")


def _memory(ax: Any, rows: list[Row]) -> None:
    ax.bar(range(len(rows)), [r.gateway or 0 for r in rows], color=GATEWAY)
    ax.set_xticks(range(len(rows)), [r.label for r in rows], fontsize=8)
    ax.axhline(120, color=TARGET, linestyle="--", label="target ≤ 120 MB")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)


def _embed(ax: Any, rows: list[Row]) -> None:
    ns = [r.workers or 0 for r in rows]
    times = [r.gateway or 0 for r in rows]
    ax.plot(ns, times, "o-", color=GATEWAY, label="gateway")
    ax.plot(ns, [times[0] * ns[0] / n for n in ns], ":", color=DIRECT, label="ideal (1/N)")
    ax.set_xticks(ns)
    ax.set_xlabel("workers (N)")
    ax.set_ylabel("s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


PANELS: list[tuple[str, Draw, Pick]] = [
    ("a, b: latency (ms)", _bars, _figures("a", "b")),
    ("c, d: throughput, gateway / direct", _ratios, _figures("c", "d")),
    ("e: scaling efficiency", _scaling, _figures("e")),
    ("f: API resident memory", _memory, _figures("f")),
    ("embed: one /api/embed over N workers", _embed, _figures("embed")),
]


def plot(rows: list[Row], path: Path, title: str) -> None:
    """One panel per group of figures that was run."""
    import matplotlib  # only here: slow to import, and needed once at the very end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, draw, chosen) for name, draw, pick in PANELS if (chosen := pick(rows))]
    if not panels:
        return
    columns = min(3, len(panels))
    rows_n = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(5.2 * columns, 4.4 * rows_n), squeeze=False)
    for ax, (name, draw, chosen) in zip(axes.flat, panels, strict=False):
        draw(ax, chosen)
        ax.set_title(name, fontsize=10)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
