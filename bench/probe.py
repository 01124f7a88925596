"""What the processes under load cost: CPU seconds by role, and resident memory."""

from __future__ import annotations

import psutil

__all__ = ["CpuMeter", "rss_mb"]


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MB (10^6 bytes)."""
    return float(psutil.Process(pid).memory_info().rss) / 1e6


class CpuMeter:
    """CPU seconds (user + system) used by groups of processes since ``start``."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self._roles = {role: [psutil.Process(pid) for pid in pids] for role, pids in roles.items()}
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {role: sum(_cpu(p) for p in procs) for role, procs in self._roles.items()}

    def start(self) -> None:
        self._start = self._read()

    def since_start(self) -> dict[str, float]:
        now = self._read()
        return {role: now[role] - self._start.get(role, now[role]) for role in now}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)
