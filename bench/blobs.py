"""Figure blob: one blob uploaded to two hosts through the gateway (``oshepherd.api.blobs``).

The blob (1 GiB by default) is generated on the fly, never stored: each MiB is its index
repeated, hashed once beforehand for its digest. It goes to two stand-ins, first straight
(direct: one upload per host, at the same time, as a user without the gateway would do at
best), then through the gateway to two fresh ones (each behind its worker), always with
httpx streaming the body as ollama-python's ``create_blob`` does. A sampler reads the
resident memory of the API and the workers, and Redis's ``used_memory``, every 20 ms: the
rows give the peak growth over the value after a small warm-up upload, which must stay a
few MiB whatever the size.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import redis

from bench.fleet import Lab
from bench.harness import Profile
from bench.probe import CpuMeter
from bench.report import Row, Target

__all__ = ["upload"]

MIB = 1 << 20
HOSTS = 2
MODEL = "blobs:latest"
SAMPLE_EVERY = 0.02  # seconds
# The warm-up upload before the idle readings (imports, connections, first buffers): more
# than a window of chunks, far less than the blob.
WARM_MIB = 8
# "A few MiB" for the API and a worker, whatever the blob's size; Redis holds a window of
# chunks per target (api.blobs.WINDOW, 4 MiB) and a few being moved.
RSS_BOUND, REDIS_BOUND = 8.0, 4.0 * HOSTS + 8.0


def upload(lab: Lab, profile: Profile) -> list[Row]:
    """The blob figure: throughput direct and through the gateway, then the peaks."""
    size = profile.blob_mib
    digest = _digest(size)
    with lab.fleet() as fleet:
        fleet.start_api()
        direct = _direct([fleet.standin_process(MODEL).url for _ in range(HOSTS)], digest, size)
        hosts = [fleet.standin_process(MODEL) for _ in range(HOSTS)]
        for host in hosts:
            fleet.worker(host)
        fleet.wait_for_models(MODEL, workers=HOSTS)
        pids = fleet.pids()
        _post(fleet.url, _digest(WARM_MIB), WARM_MIB)
        store = redis.Redis.from_url(fleet.stack.redis_url)
        probes: dict[str, Callable[[], float]] = {
            "api": _rss(pids["api"][0]),
            **{f"worker {i}": _rss(pid) for i, pid in enumerate(pids["worker"])},
            "redis": lambda: float(store.info("memory")["used_memory"]),
        }
        meter = CpuMeter({**pids, "client": [os.getpid()]})
        with _Peaks(probes) as peaks:
            meter.start()
            gateway = _post(fleet.url, digest, size)
            cpu = meter.since_start()
        missing = [h.url for h in hosts if httpx.head(f"{h.url}/api/blobs/{digest}").is_error]
        store.close()
    return _rows(size, direct, gateway, peaks.grown, cpu, missing)


def _rows(
    size: int,
    direct: float,
    gateway: float,
    grown: dict[str, float],
    cpu: dict[str, float],
    missing: list[str],
) -> list[Row]:
    label = f"{size / 1024:g} GiB" if size >= 1024 else f"{size} MiB"
    workers = [mib for name, mib in grown.items() if name.startswith("worker")]
    per_gib = ", ".join(f"{role} {seconds * 1024 / size:.2f}" for role, seconds in cpu.items())
    notes = [f"CPU s per GiB through the gateway: {per_gib}"]
    if missing:
        notes.append(f"hosts without the blob afterwards: {', '.join(missing)}")
    return [
        Row(
            "blob",
            f"upload of {label} to {HOSTS} hosts",
            "MiB/s",
            size / direct,
            size / gateway,
            "ratio",
            errors=len(missing),
            notes=notes,
        ),
        _peak("API RSS growth", grown["api"], RSS_BOUND),
        _peak("worker RSS growth (the larger)", max(workers), RSS_BOUND),
        _peak("Redis memory growth", grown["redis"], REDIS_BOUND),
    ]


def _peak(label: str, grown: float, bound: float) -> Row:
    target = Target("<=", bound, on="gateway")
    return Row("blob", f"{label}, peak", "MiB", None, grown, "value", target)


def _blocks(size: int) -> Iterator[bytes]:
    """The blob, a MiB at a time: each MiB is its index repeated."""
    for i in range(size):
        yield i.to_bytes(8, "big") * (MIB // 8)


def _digest(size: int) -> str:
    sha = hashlib.sha256()
    for block in _blocks(size):
        sha.update(block)
    return f"sha256:{sha.hexdigest()}"


def _direct(bases: list[str], digest: str, size: int) -> float:
    """Seconds to upload the blob to every one of ``bases`` at once, one thread each."""
    took: list[float] = []

    def one(base: str) -> None:
        took.append(_post(base, digest, size))

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(base,)) for base in bases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(took) != len(bases):
        raise RuntimeError("a direct upload failed")
    return time.perf_counter() - started


def _post(base: str, digest: str, size: int) -> float:
    """Seconds to upload the blob to ``base``; raises on any answer but 200 or 201."""
    started = time.perf_counter()
    response = httpx.post(f"{base}/api/blobs/{digest}", content=_blocks(size), timeout=600)
    took = time.perf_counter() - started
    if response.status_code not in (200, 201):
        raise RuntimeError(f"upload to {base}: {response.status_code} {response.text[:200]}")
    return took


def _rss(pid: int) -> Callable[[], float]:
    """The resident set of process ``pid``, in bytes."""
    process = psutil.Process(pid)
    return lambda: float(process.memory_info().rss)


class _Peaks:
    """Samples each probe on a thread while the block runs; ``grown``: each one's peak over
    its value at the start, in MiB."""

    def __init__(self, probes: dict[str, Callable[[], float]]) -> None:
        self._probes = probes
        self._start = {name: probe() for name, probe in probes.items()}
        self._peak = dict(self._start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            for name, probe in self._probes.items():
                self._peak[name] = max(self._peak[name], probe())

    @property
    def grown(self) -> dict[str, float]:
        return {name: (self._peak[name] - self._start[name]) / MIB for name in self._probes}
