"""The Celery side of a worker: the task, the queue-following bootstep, and the app.

Ack policy: *at most once, no prefetch*. Queues are consumed with ``no_ack`` and
``worker_disable_prefetch`` makes the consumer fetch only when a slot is free. So a
generation longer than kombu's visibility timeout is never handed out again while it runs
(that is what acks_late would do), a worker holds no job it is not running, and a job whose
worker dies is re-run by the API, at most once, only if its client had received nothing.
``no_ack`` also spares kombu's unacked-message bookkeeping, which bought nothing here (a
job restored an hour later is past its deadline and skipped); ``transport`` makes Celery's
acks of such messages free. ``task_acks_late`` cannot cause a redelivery (a ``no_ack``
message is never in kombu's unacked set); it is there because Celery schedules the ack on
the consumer's event loop: acking when a job *ends* wakes the consumer to fetch the next
job at once, where an ack at the start left a full worker idle for up to a second.

Scheduling (docs/scheduling.md) is kombu's: with the ``priority_steps`` of ``protocol``, one
BRPOP names the lists of every queue the worker follows, highest priority first, and the
queue cycle moves the queue it took from to the end (round robin among tenants' queues).
``FollowModels`` adds and cancels queues as ``WorkerRuntime.model_queues`` changes.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import urllib.parse
from collections.abc import Iterator
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_shutting_down
from celery.worker.consumer import Consumer
from kombu import Queue

from oshepherd.config import VISIBILITY_TIMEOUT, WorkerSettings, sentinel_url
from oshepherd.protocol import PRIORITY_STEPS, TASK_NAME, worker_queue
from oshepherd.worker.runtime import WorkerRuntime

__all__ = ["broker", "make_app", "run_worker"]

log = logging.getLogger(__name__)

# Seconds between two looks at the runtime's queues: a cold model's queue that has become
# due (a job waited WARM_WAIT) is followed this soon; a look that finds no change is free.
QUEUE_SYNC_INTERVAL = 0.05


def broker_tls(url: str) -> dict[str, Any] | None:
    """kombu's TLS options for a ``rediss://`` URL without ``ssl_cert_reqs``: verify the
    server's certificate (redis-py's default for such a URL). kombu would otherwise speak
    plain text to it through a transport named by module (``broker_transport``), where its
    own rediss transport would skip the verification. None for any other URL, whose
    ``ssl_*`` query parameters kombu reads itself (docs/redis-acl.md)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in urllib.parse.parse_qs(parts.query):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def broker(url: str) -> tuple[str, str, dict[str, Any]]:
    """kombu's broker URL, transport class and transport options for ``url``: a
    ``sentinel://`` URL (``config.SentinelUrl``) becomes kombu's own form of it, the
    Sentinel transport, and the master's name and sentinels' credentials."""
    options: dict[str, Any] = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "priority_steps": list(PRIORITY_STEPS),
    }
    target = sentinel_url(url)
    if target is None:
        return url, "oshepherd.worker.transport:Transport", options
    return (
        target.kombu_url(),
        "oshepherd.worker.transport:SentinelTransport",
        {**options, **target.kombu_options()},
    )


def stay(alternates: list[str]) -> Iterator[str | None]:
    """The broker's failover strategy: on a lost connection, stay on the first URL's host.
    A sentinel:// broker lists every sentinel as an alternate URL; kombu's Sentinel
    channel asks each of them for the primary whichever is current, and a switch to
    another would replace this module's transport with kombu's own (``Connection.switch``
    takes the transport from the URL's scheme). A host alone keeps it."""
    return itertools.repeat(urllib.parse.urlsplit(alternates[0]).hostname)


def make_app(settings: WorkerSettings, runtime: WorkerRuntime) -> Celery:
    url, transport, transport_options = broker(settings.celery_broker_url)
    app = Celery("oshepherd", broker=url, backend=settings.celery_backend_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        # Celery prefers the environment's CELERY_BROKER_URL to its broker setting; these
        # win over it, so the worker uses kombu's form of a sentinel:// URL.
        broker_read_url=url,
        broker_write_url=url,
        broker_transport=transport,
        broker_failover_strategy=stay,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_use_ssl=broker_tls(settings.celery_broker_url),
        broker_transport_options=transport_options,
        task_default_queue=worker_queue(settings.worker_id),
        task_queues=[Queue(worker_queue(settings.worker_id), no_ack=True)],
    )

    @app.task(name=TASK_NAME, ignore_result=True)
    def run_job(job: dict[str, Any]) -> None:
        runtime.run(job)

    class FollowModels(bootsteps.StartStopStep):
        """Consume exactly the queues of the models the host has, following its changes."""

        requires = {"celery.worker.consumer.tasks:Tasks"}  # noqa: RUF012 (Celery's API)

        def start(self, c: Consumer) -> None:
            self._followed: frozenset[str] | None = None
            self._timer = c.timer.call_repeatedly(QUEUE_SYNC_INTERVAL, self.sync, (c,))
            self.sync(c)

        def stop(self, c: Consumer) -> None:
            self._timer.cancel()

        def sync(self, c: Consumer) -> None:
            wanted = runtime.model_queues
            if c.task_consumer is None or wanted is self._followed:
                return
            self._followed = wanted
            current = {q.name for q in c.task_consumer.queues}
            own = worker_queue(settings.worker_id)
            for name in wanted - current:
                log.info("consuming %s", name)
                c.add_task_queue(name, no_ack=True)
            for name in current - wanted - {own}:
                log.info("no longer consuming %s", name)
                c.cancel_task_queue(name)

    app.steps["consumer"].add(FollowModels)
    return app


def run_worker(settings: WorkerSettings) -> int:
    """Run a worker until it is told to stop; returns its exit code."""
    if settings.loglevel != "DEBUG":
        # Two INFO lines per job ("received", "succeeded") cost more than the hop itself.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    runtime = WorkerRuntime(settings)
    runtime.start()
    app = make_app(settings, runtime)

    def on_shutting_down(**_: Any) -> None:
        runtime.drain()

    worker_shutting_down.connect(on_shutting_down, weak=False)
    try:
        worker = app.Worker(
            hostname=f"{settings.worker_id}@oshepherd",
            pool_cls="threads",
            concurrency=settings.concurrency,
            queues=[worker_queue(settings.worker_id)],
            loglevel=settings.loglevel,
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            quiet=True,
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        worker_shutting_down.disconnect(on_shutting_down)
        runtime.stop()
