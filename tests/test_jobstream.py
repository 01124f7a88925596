"""A job's frames as its response reads them, fed by hand into a real inbox (no Redis):
order, gaps, stale attempts, re-runs and the liveness verdicts."""

from __future__ import annotations

import time
from typing import Any, cast

import anyio
import pytest
from redis.asyncio import Redis

from oshepherd.api.errors import JobFailed, NoHealthyWorker, QueueTimeout, RedisUnavailable
from oshepherd.api.inbox import LOST, Inbox, Inboxes
from oshepherd.api.jobstream import LIVENESS_TICK, JobStream, Liveness
from oshepherd.protocol import CANCEL_ALL, Data, End, Error, Frame, Head, Job, Ping, Start
from oshepherd.usage import Usage

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]

NDJSON = "application/x-ndjson"


class Fleet:
    """What the dispatcher would answer: which workers live, what was cancelled and re-run."""

    def __init__(self, *, rerun: bool = False, lost: bool = False) -> None:
        self.dead: set[str] = set()
        self.cancels: list[tuple[int, bytes]] = []
        self.reruns: list[str | None] = []
        self._rerun = rerun
        self._lost = lost
        self.takers_left = True

    def alive(self, worker: str) -> bool:
        return worker not in self.dead

    def takers(self, job: Job) -> bool:
        return self.takers_left

    async def supersede(self, job: Job, message: bytes) -> bool:
        """Whether the attempt left its queue without starting (then it never will)."""
        return self._lost

    async def cancel(self, job: Job, message: bytes, before: int) -> None:
        self.cancels.append((before, message))

    async def rerun(self, job: Job, worker: str | None) -> bytes | None:
        self.reruns.append(worker)
        if not self._rerun:
            return None
        job.attempt += 1
        return b"message-%d" % job.attempt


def stream(
    fleet: Fleet, *, deadline: float | None = 60.0, stall: float = 60.0
) -> tuple[JobStream, Inbox]:
    """A job's stream; ``deadline`` is its queue timeout (None: none, QUEUE_TIMEOUT unset)."""
    inbox = Inboxes(cast(Redis, None), "api").open("j1")  # fed by hand, never subscribed
    latest = None if deadline is None else time.time() + deadline
    job = Job("j1", "channel", "POST", "/api/chat", "{}", "m:latest", latest)
    liveness = Liveness(
        alive=fleet.alive,
        supersede=fleet.supersede,
        takers=fleet.takers,
        revoked=lambda job: False,
        queue_timeout=deadline,
        stall_timeout=stall,
        orphaned_after=0.5,
    )
    jobs = JobStream(
        job, b"message-0", inbox, liveness=liveness, cancel=fleet.cancel, rerun=fleet.rerun
    )
    return jobs, inbox


def feed(inbox: Inbox, *frames: Frame) -> None:
    for frame in frames:
        inbox.put(frame.encode())


def head(seq: int = 1, attempt: int = 0, **fields: Any) -> Head:
    values = {"status": 200, "content_type": NDJSON, "last": False, "body": b"{}\n", **fields}
    return Head(seq=seq, attempt=attempt, **values)


async def test_frames_arrive_in_order_pings_and_stale_attempts_skipped() -> None:
    fleet = Fleet()
    jobs, inbox = stream(fleet)
    feed(
        inbox,
        Start(seq=0, attempt=0, worker="w1"),
        Ping(seq=1, attempt=0),
        Data(seq=5, attempt=3, body=b"stale\n"),
        head(seq=2),
        Data(seq=3, attempt=0, body=b"a\n"),
        End(seq=4, attempt=0, body=b"z"),
    )
    assert (await jobs.head()).body == b"{}\n" and jobs.worker == "w1"
    assert await jobs.next() == Data(seq=3, attempt=0, body=b"a\n")
    assert await jobs.next() == End(seq=4, attempt=0, body=b"z")
    await jobs.close()
    assert fleet.cancels == []  # it ended well


async def test_a_gap_fails_the_stream_and_close_cancels_the_job() -> None:
    fleet = Fleet()
    jobs, inbox = stream(fleet)
    feed(inbox, Start(seq=0, attempt=0, worker="w1"), head(seq=1), Data(seq=3, attempt=0))
    await jobs.head()
    with pytest.raises(JobFailed, match="lost frames from worker w1") as failed:
        await jobs.next()
    assert failed.value.status == 502
    await jobs.close()
    assert fleet.cancels == [(CANCEL_ALL, b"message-0")]


async def test_a_lost_pubsub_connection_is_redis_unavailable() -> None:
    jobs, inbox = stream(Fleet())
    inbox.put(LOST)
    with pytest.raises(RedisUnavailable) as failed:
        await jobs.head()
    assert (failed.value.status, failed.value.retry_after) == (503, 5)


async def test_a_retryable_error_before_the_head_is_rerun_when_the_dispatcher_says_so() -> None:
    fleet = Fleet(rerun=True)
    jobs, inbox = stream(fleet)
    feed(
        inbox,
        Start(seq=0, attempt=0, worker="w1"),
        Error(seq=1, attempt=0, status=502, error="cannot reach its Ollama", retry=True),
        Start(seq=0, attempt=1, worker="w2"),
        head(seq=1, attempt=1, last=True),
    )
    assert (await jobs.head()).last and jobs.worker == "w2"
    assert fleet.reruns == ["w1"]


async def test_an_error_before_the_head_is_the_answer_when_not_rerun() -> None:
    fleet = Fleet()
    jobs, inbox = stream(fleet)
    feed(
        inbox,
        Start(seq=0, attempt=0, worker="w1"),
        Error(seq=1, attempt=0, status=502, error="cannot reach its Ollama", retry=True),
    )
    with pytest.raises(JobFailed, match="cannot reach its Ollama"):
        await jobs.head()
    assert fleet.reruns == ["w1"]


async def test_a_job_nobody_takes_by_its_deadline_times_out_and_is_cancelled() -> None:
    fleet = Fleet()
    jobs, _ = stream(fleet, deadline=0.05)
    with pytest.raises(QueueTimeout) as failed:
        await jobs.head()
    assert (failed.value.status, failed.value.retry_after) == (503, 5)
    await jobs.close()
    assert fleet.cancels == [(CANCEL_ALL, b"message-0")]


async def test_without_a_deadline_a_job_waits_and_one_lost_before_starting_is_found() -> None:
    waiting, _ = stream(Fleet(), deadline=None)
    assert not waiting.job.expired()
    with anyio.move_on_after(2 * LIVENESS_TICK) as still_waiting:
        await waiting.head()
    assert still_waiting.cancelled_caught
    fleet = Fleet(lost=True)  # a worker took it, then died before it could start it
    lost, _ = stream(fleet, deadline=None)
    with pytest.raises(JobFailed, match="went away"):
        await lost.head()
    assert fleet.reruns == [None]


async def test_a_worker_that_went_away_mid_stream_fails_it() -> None:
    fleet = Fleet()
    jobs, inbox = stream(fleet)
    feed(inbox, Start(seq=0, attempt=0, worker="w1"), head(seq=1))
    await jobs.head()
    fleet.dead.add("w1")
    with pytest.raises(JobFailed, match="worker w1 went away"):
        await jobs.next()


async def test_a_silent_worker_stalls_with_504() -> None:
    jobs, inbox = stream(Fleet(), stall=0.01)
    feed(inbox, Start(seq=0, attempt=0, worker="w1"), head(seq=1))
    await jobs.head()
    with pytest.raises(JobFailed, match="worker w1 stalled") as failed:
        await jobs.next()
    assert failed.value.status == 504


async def test_a_job_no_live_worker_can_take_fails_after_a_grace_and_is_withdrawn() -> None:
    fleet = Fleet()
    fleet.takers_left = False  # its model's only worker died while the job waited
    jobs, _ = stream(fleet, deadline=None)
    with pytest.raises(NoHealthyWorker) as failed:
        await jobs.head()
    assert (failed.value.status, failed.value.retry_after) == (503, 5)
    await jobs.close()
    assert fleet.cancels == [(CANCEL_ALL, b"message-0")]


async def test_a_worker_that_comes_back_in_time_keeps_the_job_waiting() -> None:
    fleet = Fleet()
    fleet.takers_left = False
    jobs, _ = stream(fleet, deadline=None)
    with anyio.move_on_after(LIVENESS_TICK * 1.2):  # one look: orphaned, within the grace
        await jobs.head()
    fleet.takers_left = True  # a worker restarted
    with anyio.move_on_after(2 * LIVENESS_TICK) as still_waiting:
        await jobs.head()
    assert still_waiting.cancelled_caught


async def test_a_client_gone_at_the_end_still_counts_the_answers_tokens() -> None:
    """An SDK hangs up on an OpenAI stream's [DONE]: the End with the tokens comes after."""
    fleet = Fleet()
    jobs, inbox = stream(fleet)
    used = Usage()
    counted = JobStream(
        jobs.job, b"message-0", inbox, liveness=jobs._liveness, cancel=fleet.cancel,
        rerun=fleet.rerun, usage=used,
    )  # fmt: skip
    feed(inbox, Start(seq=0, attempt=0, worker="w1"), head(seq=1))
    await counted.head()
    end = End(seq=2, attempt=0, body=b"data: [DONE]\n\n", prompt_tokens=5, completion_tokens=7)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(counted.close)  # the client is gone
        await anyio.sleep(0.05)
        feed(inbox, end)
    assert used.models == {"m:latest": [5, 7]}
    assert fleet.cancels == [(CANCEL_ALL, b"message-0")]
