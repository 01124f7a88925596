"""What a worker's jobs counted, carried to Redis with its heartbeat for the API's metrics.

Workers cannot be scraped (they sit behind NAT), so each keeps a tally of the tokens its
jobs used, per model, and adds it to its hash in Redis (``protocol.worker_stats_key``) in
the heartbeat's own pipeline: no extra round trip per job, figures at most a heartbeat
interval late. The API's ``/metrics/fleet`` reads the hashes at scrape time
(``oshepherd.api.metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oshepherd.protocol import STATS_TTL, worker_stats_key
from oshepherd.tokens import Counts

__all__ = ["Tally"]


@dataclass(slots=True)
class _Model:
    prompt: int = 0
    completion: int = 0
    generated: int = 0  # completion tokens of the jobs that gave Ollama's eval_duration
    generation_ns: int = 0  # their eval_duration, nanoseconds


class Tally:
    """The counts of the jobs finished since the last heartbeat, per normalized model."""

    def __init__(self, worker_id: str) -> None:
        self._key = worker_stats_key(worker_id)
        self._models: dict[str, _Model] = {}

    def add(self, model: str, counts: Counts) -> None:
        """A job of ``model`` ended with Ollama's ``counts`` (tokens, eval_duration in ns)."""
        if not model:
            return
        tally = self._models.get(model)
        if tally is None:
            tally = self._models[model] = _Model()
        tally.prompt += counts.prompt
        tally.completion += counts.completion
        if counts.eval_duration > 0:
            tally.generated += counts.completion
            tally.generation_ns += counts.eval_duration

    def flush(self, pipe: Any) -> dict[str, _Model]:
        """Queue the tally's writes on the Redis pipeline ``pipe`` and start a new one: the
        token counters HINCRBY'd, the generation speed (tokens/s) of each model that has one
        HSET, the hash's expiry renewed. Returns what was taken, for ``restore`` should the
        pipeline fail."""
        taken, self._models = self._models, {}
        speeds: dict[str, float] = {}
        for model, tally in taken.items():
            if tally.prompt:
                pipe.hincrby(self._key, f"{model}|prompt", tally.prompt)
            if tally.completion:
                pipe.hincrby(self._key, f"{model}|completion", tally.completion)
            if tally.generation_ns:
                speeds[f"{model}|tps"] = tally.generated * 1e9 / tally.generation_ns
        if speeds:
            pipe.hset(self._key, mapping=speeds)
        pipe.expire(self._key, STATS_TTL)
        return taken

    def restore(self, taken: dict[str, _Model]) -> None:
        """Put back what a failed ``flush`` took (the heartbeat did not reach Redis)."""
        for model, tally in taken.items():
            self.add(model, Counts(tally.prompt, tally.completion - tally.generated))
            self.add(model, Counts(0, tally.generated, tally.generation_ns))
