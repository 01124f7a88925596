"""``python -m bench [--quick] [--only a,b,...]``: run the figures, print and write them."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bench import (
    blobs,
    cores,
    fleetsize,
    keys,
    latency,
    metrics,
    report,
    scale,
    scheduling,
    soak,
)
from bench.fleet import Lab, raise_open_file_limit
from bench.harness import DEFAULT, QUICK, Profile
from bench.report import Row

RESULTS = Path(__file__).resolve().parent / "results"
Group = Callable[[Lab, Profile, set[str]], list[Row]]
GROUPS: list[tuple[frozenset[str], Group]] = [
    (frozenset(latency.FIGURES), latency.run),
    (frozenset({"e"}), lambda lab, profile, wanted: scale.scaling(lab, profile)),
    (frozenset({"f", "g"}), lambda lab, profile, wanted: scale.held_streams(lab, profile)),
    (frozenset({"embed"}), lambda lab, profile, wanted: scale.embed(lab, profile)),
    (frozenset({"soak"}), lambda lab, profile, wanted: soak.soak(lab, profile)),
    (frozenset({"blob"}), lambda lab, profile, wanted: blobs.upload(lab, profile)),
    (frozenset({"fair"}), lambda lab, profile, wanted: scheduling.fair_share(lab, profile)),
    (frozenset({"warm"}), lambda lab, profile, wanted: scheduling.warm_first(lab, profile)),
    (frozenset({"keys"}), lambda lab, profile, wanted: keys.keys_overhead(lab, profile)),
    (frozenset({"metrics"}), lambda lab, profile, wanted: metrics.metrics_overhead(lab, profile)),
    (frozenset({"scrape"}), lambda lab, profile, wanted: metrics.scrape(lab, profile)),
    (frozenset({"fleet100"}), lambda lab, profile, wanted: fleetsize.fleet100(lab, profile)),
    (frozenset({"cores"}), lambda lab, profile, wanted: cores.api_processes(lab, profile)),
]
FIGURES = [f for figures, _ in GROUPS for f in sorted(figures)]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--only", default="", help=f"comma-separated, among {','.join(FIGURES)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args(argv)
    args.wanted = {f.strip() for f in args.only.split(",") if f.strip()} or set(FIGURES)
    if unknown := args.wanted - set(FIGURES):
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_groups(lab: Lab, profile: Profile, wanted: set[str]) -> tuple[list[Row], int]:
    """Every group with a wanted figure; a group that crashes is reported, the rest go on."""
    rows: list[Row] = []
    crashed = 0
    for figures, group in GROUPS:
        if not figures & wanted:
            continue
        started = time.monotonic()
        print(f"-- {', '.join(sorted(figures & wanted))} ...", file=sys.stderr, flush=True)
        try:
            done = group(lab, profile, wanted & figures)
        except Exception:
            traceback.print_exc()
            crashed += 1
            continue
        print(report.table(done), file=sys.stderr)
        print(f"   ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        rows += done
    return rows, crashed


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    profile = QUICK if args.quick else DEFAULT
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on kill as on Ctrl-C
    raise_open_file_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"oshepherd bench, {datetime.now():%Y-%m-%d %H:%M}, "
        f"{'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs"
    )
    with (args.out / "processes.log").open("ab") as log, Lab(log) as lab:
        rows, crashed = _run_groups(lab, profile, args.wanted)
    print(f"\n{title}\n\n{report.table(rows)}\n")
    for path in report.write(rows, args.out, title):
        print(f"wrote {path}")
    return 1 if crashed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process the bench started is stopped", file=sys.stderr)
        sys.exit(130)
