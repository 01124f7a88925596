"""Figure fleet100: the gateway in front of 100 registered workers holding 200 models.

Two fleets side by side, each on a Redis of its own (so that Redis's counters and CPU are
each fleet's alone):

- fleet2 (the direct column): an API and ``REAL`` real workers, each a Celery worker process
  with ``SLOTS`` slots in front of a stand-in process holding ``tiny`` (loaded) and one cold
  model.
- fleet100 (the gateway column): the same, plus ``FAKES`` fake workers written by one light
  process (``bench.fakeworkers``): registry entries with a TTL on the workers' heartbeat,
  BRPOPs on their queues and the cold-queue script on the workers' clocks, each holding
  ``EACH`` of the ``MODELS - 1 - REAL`` other models (two holders per model); they take no
  job. Only the real workers serve requests; the fakes make the registry, the tags and
  Redis's idle load those of a 100-worker fleet.

Measured: streamed /api/generate of ``tiny`` at concurrency 1, the fleets in turn for
``rounds`` rounds (TTFT; API and Redis CPU per request from psutil; Redis commands per
request from ``INFO commandstats`` over each run, gross and net of the idle rate); the idle
rate of each fleet's Redis (commands/s and CPU) over ``IDLE`` seconds with no load, per
worker; one registry refresh (``Registry.refresh``, the API's own code, run here): wall and
CPU time and the bytes Redis sends; /api/tags answer times p50/p99.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import orjson
import psutil
import redis
import uvloop
from redis.asyncio import Redis as AsyncRedis

from bench.fakeworkers import fake_models
from bench.fleet import Lab
from bench.harness import Profile, measure, percentile
from bench.latency import TINY, TINY_TOKENS, generate_request
from bench.load import Run
from bench.report import Row
from oshepherd.api.registry import Registry
from oshepherd.protocol import WORKERS_INDEX, WorkerEntry, worker_key
from oshepherd.stack import Component, wait_until
from oshepherd.testing.fleet import Fleet

__all__ = ["fleet100"]

REAL = 2  # real workers in each fleet
FAKES = 98
MODELS = 200
EACH = 4  # models per fake worker
SLOTS = 16
IDLE = 5.0  # seconds of each idle window
REFRESHES = 50
TAGS_CALLS = 400


def fleet100(lab: Lab, profile: Profile) -> list[Row]:
    """fleet100: costs of a 100-worker fleet against a 2-worker one (same run, in turn)."""
    with lab.fleet() as small, lab.separate_fleet() as big:
        for fleet in (small, big):
            _real_workers(fleet)
        fakes = _start_fakes(big)
        try:
            small.start_api()
            big.start_api()
            total = 1 + REAL + len({m for i in range(FAKES) for m in _held(i)})
            for fleet, models in ((small, 1 + REAL), (big, total)):
                wait_until(partial(_tags_at_least, fleet, models), 30, f"{models} models")
            rows = _counts_rows(big, total)
            rows += _idle_rows(small, big)
            rows += _refresh_rows(small, big)
            rows += _tags_rows(small, big)
            rows += _request_rows(small, big, profile)
        finally:
            fakes.stop(timeout=5)
    return rows


def _held(index: int) -> list[str]:
    return fake_models(index, MODELS - 1 - REAL, EACH)


def _real_workers(fleet: Fleet) -> None:
    """``REAL`` stand-ins holding ``tiny`` and a cold model, each behind a worker; ``tiny``
    loaded on each (a request straight to the stand-in) and advertised as loaded."""
    for i in range(REAL):
        host = fleet.standin_process(TINY, f"cold{i}:latest", tokens=TINY_TOKENS)
        httpx.post(host.url + "/api/generate", json={"model": TINY, "prompt": "hi"}, timeout=10)
        worker = fleet.worker(host, concurrency=SLOTS)
        wait_until(partial(_running, fleet, worker.meta["id"]), 15, "tiny loaded")


def _running(fleet: Fleet, worker_id: str) -> bool:
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        raw = client.get(worker_key(worker_id))
    return raw is not None and bool(WorkerEntry.from_json(raw).running)


def _start_fakes(fleet: Fleet) -> Component:
    """The fake workers' process, their entries built from a real worker's."""
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        worker_id = client.zrange(WORKERS_INDEX, 0, 0)[0].decode()
        entry = WorkerEntry.from_json(client.get(worker_key(worker_id)) or b"")
    templates = {"model": entry.models[0], "running": entry.running[0]}
    path = Path(tempfile.mkstemp(prefix="oshepherd-fakes-", suffix=".json")[1])
    path.write_bytes(orjson.dumps(templates))
    command = [sys.executable, "-m", "bench.fakeworkers", "--redis", fleet.stack.redis_url]
    command += ["--count", str(FAKES), "--models", str(MODELS - 1 - REAL), "--each", str(EACH)]
    command += ["--templates", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fakes = Component("fakeworkers", process)
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        fakes.wait_ready(lambda: client.zcard(WORKERS_INDEX) >= REAL + FAKES, 30)
    return fakes


def _tags_at_least(fleet: Fleet, count: int) -> bool:
    response = httpx.get(fleet.url + "/api/tags", timeout=5)
    return response.status_code == 200 and len(response.json()["models"]) >= count


def _counts_rows(big: Fleet, models: int) -> list[Row]:
    with redis.Redis.from_url(big.stack.redis_url) as client:
        workers = int(client.zcard(WORKERS_INDEX))
    note = (
        f"fleet100: {REAL} real workers ({SLOTS} slots each, in front of stand-in processes) "
        f"+ {FAKES} fake workers on the wire (bench.fakeworkers: heartbeats with TTL, BRPOP, "
        f"the cold-queue script; no jobs), {EACH} models each; direct = fleet2: the same "
        f"{REAL} real workers alone. Each fleet on its own Redis"
    )
    return [
        Row("fleet100", "registered workers", "", REAL, workers, notes=[note]),
        Row("fleet100", "models in /api/tags", "", 1 + REAL, models),
    ]


class RedisProbe:
    """One fleet's Redis: commands served (``INFO commandstats``, less the probe's own
    INFO) and its process's CPU seconds."""

    def __init__(self, fleet: Fleet) -> None:
        self._client = redis.Redis.from_url(fleet.stack.redis_url)
        self.pid = int(self._client.info("server")["process_id"])
        self._process = psutil.Process(self.pid)

    def read(self) -> tuple[dict[str, int], float]:
        stats = self._client.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        calls.pop("info", None)
        times = self._process.cpu_times()
        return calls, float(times.user + times.system)

    def usec(self) -> int:
        """Microseconds Redis has spent executing commands (``INFO commandstats``)."""
        stats = self._client.info("commandstats")
        return sum(int(v["usec"]) for k, v in stats.items() if k != "cmdstat_info")

    @staticmethod
    def delta(
        before: tuple[dict[str, int], float], after: tuple[dict[str, int], float]
    ) -> tuple[dict[str, int], float]:
        calls = {k: v - before[0].get(k, 0) for k, v in after[0].items()}
        return {k: v for k, v in calls.items() if v}, after[1] - before[1]


def _idle(fleets: dict[str, Fleet]) -> dict[str, tuple[dict[str, int], float, float]]:
    """Per fleet: commands by name, Redis CPU seconds and API CPU seconds over ``IDLE`` s."""
    probes = {name: RedisProbe(f) for name, f in fleets.items()}
    apis = {name: psutil.Process(f.pids()["api"][0]) for name, f in fleets.items()}
    before = {name: (p.read(), sum(apis[name].cpu_times()[:2])) for name, p in probes.items()}
    time.sleep(IDLE)  # the window itself: nothing to wait for
    out = {}
    for name, probe in probes.items():
        calls, cpu = RedisProbe.delta(before[name][0], probe.read())
        out[name] = (calls, cpu, sum(apis[name].cpu_times()[:2]) - before[name][1])
    return out


def _idle_rows(small: Fleet, big: Fleet) -> list[Row]:
    idle = _idle({"fleet2": small, "fleet100": big})
    (c2, r2, a2), (c100, r100, a100) = idle["fleet2"], idle["fleet100"]
    rows = [
        Row("fleet100", "idle Redis commands/s", "cmd/s", sum(c2.values()) / IDLE,
            sum(c100.values()) / IDLE, "added"),
        Row("fleet100", "idle Redis commands/s per worker", "cmd/s",
            sum(c2.values()) / IDLE / REAL, sum(c100.values()) / IDLE / (REAL + FAKES), "value"),
        Row("fleet100", "idle Redis CPU per worker", "µs/s", r2 / IDLE / REAL * 1e6,
            r100 / IDLE / (REAL + FAKES) * 1e6, "value"),
        Row("fleet100", "idle API CPU (registry refresh etc.)", "ms/s", a2 / IDLE * 1e3,
            a100 / IDLE * 1e3, "added"),
    ]  # fmt: skip
    for name, calls in (("fleet2", c2), ("fleet100", c100)):
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
        rates = ", ".join(f"{k} {v / IDLE:.1f}" for k, v in top)
        rows[0].notes.append(f"{name} idle, commands/s by name (API + workers): {rates}")
    return rows


def _refresh_rows(small: Fleet, big: Fleet) -> list[Row]:
    """One ``Registry.refresh`` (the API's code, in this process): wall and CPU ms, bytes."""
    results = [_refresh_cost(f) for f in (small, big)]
    return [
        Row("fleet100", "registry refresh wall", "ms", results[0][0], results[1][0], "added"),
        Row("fleet100", "registry refresh CPU", "ms", results[0][1], results[1][1], "added",
            notes=["per refresh, in one API process; each API process refreshes every "
                   "REGISTRY_REFRESH (1 s) and on a miss"]),
        Row("fleet100", "registry refresh bytes", "kB", results[0][2], results[1][2], "added"),
    ]  # fmt: skip


def _refresh_cost(fleet: Fleet) -> tuple[float, float, float]:
    async def run() -> tuple[float, float, float]:
        client = AsyncRedis.from_url(fleet.stack.redis_url)
        registry = Registry(client, refresh=1.0)
        await registry.refresh()  # connects
        with redis.Redis.from_url(fleet.stack.redis_url) as sync:
            sent0 = int(sync.info("stats")["total_net_output_bytes"])
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(REFRESHES):
                await registry.refresh()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            sent = int(sync.info("stats")["total_net_output_bytes"]) - sent0
        await client.aclose()
        return wall / REFRESHES * 1e3, cpu / REFRESHES * 1e3, sent / REFRESHES / 1e3

    return uvloop.run(run())


def _tags_rows(small: Fleet, big: Fleet) -> list[Row]:
    """/api/tags answer times, and the API's CPU per answer (psutil, both fleets in turn)."""
    fleets = {"fleet2": small, "fleet100": big}
    times: dict[str, list[float]] = {name: [] for name in fleets}
    cpu = dict.fromkeys(fleets, 0.0)
    apis = {name: psutil.Process(f.pids()["api"][0]) for name, f in fleets.items()}
    with httpx.Client(timeout=10) as client:
        for _ in range(4):  # in turn: noise hits both alike
            for name, fleet in fleets.items():
                cpu[name] -= sum(apis[name].cpu_times()[:2])
                for _ in range(TAGS_CALLS // 4):
                    started = time.perf_counter()
                    client.get(fleet.url + "/api/tags").raise_for_status()
                    times[name].append((time.perf_counter() - started) * 1e3)
                cpu[name] += sum(apis[name].cpu_times()[:2])
    rows = [
        Row("fleet100", f"/api/tags p{q}", "ms", percentile(times["fleet2"], q),
            percentile(times["fleet100"], q), "added")
        for q in (50, 99)
    ]  # fmt: skip
    per_call = {name: cpu[name] / TAGS_CALLS * 1e3 for name in fleets}
    rows.append(Row("fleet100", "/api/tags API CPU per call", "ms", per_call["fleet2"],
                    per_call["fleet100"], "added"))  # fmt: skip
    return rows


def _request_rows(small: Fleet, big: Fleet, profile: Profile) -> list[Row]:
    """Streamed tiny generates at c=1, the fleets in turn; per run, CPU and Redis commands."""
    fleets = {"fleet2": small, "fleet100": big}
    probes = {name: RedisProbe(f) for name, f in fleets.items()}
    cpu = {f"api {n}": f.pids()["api"] for n, f in fleets.items()}
    cpu |= {f"redis {n}": [probes[n].pid] for n in fleets}
    idle_rate = _idle_rates(fleets, probes)
    runs: dict[str, list[Run]] = {n: [] for n in fleets}
    commands: dict[str, list[tuple[int, float]]] = {n: [] for n in fleets}
    per_round = max(1, profile.latency_requests // profile.rounds)
    make = generate_request(TINY, TINY_TOKENS, True)
    for round_ in range(profile.rounds):
        for name, fleet in fleets.items():
            before = probes[name].read()
            run = measure({name: fleet.url}, make, 1, count=per_round, cpu=cpu,
                          warmup=20 if round_ == 0 else 0)[name][0]  # fmt: skip
            calls, _ = RedisProbe.delta(before, probes[name].read())
            runs[name].append(run)
            commands[name].append((sum(calls.values()), run.finished - run.started))
    return _summarize(runs, commands, idle_rate) + _throughput_rows(fleets, probes, profile)


def _throughput_rows(
    fleets: dict[str, Fleet], probes: dict[str, RedisProbe], profile: Profile
) -> list[Row]:
    """Each fleet at concurrency 32 for ``profile.seconds``, after an idle window as long:
    Redis's CPU, command time (commandstats usec) and commands per request, net of idle."""
    make = generate_request(TINY, TINY_TOKENS, True)
    found: dict[str, tuple[list[float], dict[str, float]]] = {}
    for name, fleet in fleets.items():
        window = []
        for load in (False, True):
            before, usec0 = probes[name].read(), probes[name].usec()
            started = time.perf_counter()
            if load:
                run = measure({name: fleet.url}, make, 32, seconds=profile.seconds)[name][0]
            else:
                time.sleep(profile.seconds)  # the idle window itself
            calls, cpu = RedisProbe.delta(before, probes[name].read())
            window.append((calls, cpu, probes[name].usec() - usec0, time.perf_counter() - started))
        (idle_calls, idle_cpu, idle_usec, idle_s), (calls, cpu, usec, seconds) = window
        n = max(len(run.ok), 1)
        net = {k: (v - idle_calls.get(k, 0) * seconds / idle_s) / n for k, v in calls.items()}
        values = [
            n / seconds,
            (cpu - idle_cpu * seconds / idle_s) / n * 1e6,
            (usec - idle_usec * seconds / idle_s) / n,
            sum(net.values()),
        ]
        found[name] = values, net
    rows = [
        Row("fleet100", f"c=32 {label}", unit, found["fleet2"][0][i], found["fleet100"][0][i],
            "added")
        for i, (label, unit) in enumerate(
            [("req/s", "req/s"), ("Redis CPU per request, net of idle", "µs"),
             ("Redis command time per request, net of idle", "µs"),
             ("Redis commands per request, net of idle", "")]
        )
    ]  # fmt: skip
    for name in fleets:
        top = sorted(found[name][1].items(), key=lambda kv: -kv[1])[:10]
        rows[-1].notes.append(
            f"{name} c=32 commands per request: " + ", ".join(f"{k} {v:.2f}" for k, v in top)
        )
    return rows


def _idle_rates(fleets: dict[str, Fleet], probes: dict[str, RedisProbe]) -> dict[str, float]:
    """Each Redis's commands per second with no load, over a short window."""
    before = {n: p.read() for n, p in probes.items()}
    time.sleep(2.0)  # the window itself
    return {n: sum(RedisProbe.delta(before[n], probes[n].read())[0].values()) / 2.0
            for n in fleets}  # fmt: skip


def _summarize(
    runs: dict[str, list[Run]],
    commands: dict[str, list[tuple[int, float]]],
    idle_rate: dict[str, float],
) -> list[Row]:
    ok = {n: [s for r in rs for s in r.ok] for n, rs in runs.items()}
    errors = sum(len(r.errors) for rs in runs.values() for r in rs)
    ttft = {n: [s.ttft * 1e3 for s in samples] for n, samples in ok.items()}
    rows = [
        Row("fleet100", f"TTFT c=1 p{q}", "ms", percentile(ttft["fleet2"], q),
            percentile(ttft["fleet100"], q), "added", errors=errors)
        for q in (50, 99)
    ]  # fmt: skip
    rows[0].notes.append("added = fleet100 − fleet2, the fleets in turn (unpaired samples)")

    def per_request(name: str, role: str) -> float:
        """Median over the rounds of ``role``'s CPU ms per good request."""
        values = [r.cpu[f"{role} {name}"] * 1e3 / max(len(r.ok), 1) for r in runs[name]]
        return percentile(values, 50)

    def commands_per_request(name: str, net: bool) -> float:
        values = []
        for (count, seconds), run in zip(commands[name], runs[name], strict=True):
            extra = idle_rate[name] * seconds if net else 0.0
            values.append((count - extra) / max(len(run.ok), 1))
        return percentile(values, 50)

    for role in ("api", "redis"):
        rows.append(Row("fleet100", f"{role} CPU per request", "ms", per_request("fleet2", role),
                        per_request("fleet100", role), "added"))  # fmt: skip
    for net in (False, True):
        label = "Redis commands per request" + (" (net of idle)" if net else " (gross)")
        rows.append(Row("fleet100", label, "", commands_per_request("fleet2", net),
                        commands_per_request("fleet100", net), "added"))  # fmt: skip
    rows[-1].notes.append(
        "net = the commands during the run less each Redis's idle rate over the run's time; "
        "medians over the rounds"
    )
    return rows
