"""kombu's Redis transport, minus the acknowledgement of messages nobody needs to ack.

The worker consumes its queues with ``no_ack`` (see ``celery_app``), so no message is ever
in kombu's unacked index. Celery still acknowledges every task, and kombu's Redis QoS
answers each ack with a MULTI/ZREM/HDEL/EXEC round trip on the consumer thread: measured
at a third of the worker's CPU per tiny job. Here an ack of a message that was never
recorded as unacked costs nothing, and so does the periodic sweep of that index for
messages to restore; everything else is kombu's own behaviour.

Its BRPOP also waits less (``brpop_timeout``): a queue the worker starts to follow (a cold
model's that became due, a new tenant's) joins the next BRPOP, which an idle worker sends
this often (kombu's default: every second).

``SentinelTransport`` is the same for a Redis managed by Sentinel (a ``sentinel://``
broker URL, docs/redis-ha.md): kombu's Sentinel transport with these changes.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

__all__ = ["SentinelTransport", "Transport"]

# Seconds a connection to a sentinel-managed primary keeps looking for one, and between two
# looks at most (``SentinelChannel``).
FAILOVER_WAIT = 10.0
FAILOVER_POLL = 0.25


class QoS(redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        if self._delivered is not None and delivery_tag in self._delivered:
            super().ack(delivery_tag)

    def restore_visible(self, *args: object, **kwargs: object) -> None:
        """Nothing to restore: no message is ever in the unacked index (``no_ack``, and the
        API queues without kombu). kombu's sweep would take a mutex key and read the index,
        which a worker's Redis user (``oshepherd.acl``) may not touch."""


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
    brpop_timeout = 0.2  # type: ignore[assignment]  # seconds; Redis takes a float (≥ 6.0)

    def _deliver(self, message: object, queue: str) -> None:
        """A message popped off a queue the worker has just stopped following (its BRPOP
        was under way as the queue was cancelled) runs like any other: every queue feeds
        the one Celery consumer, and the worker's own queue is always followed. kombu would
        requeue it, a list push that a worker's Redis user (``oshepherd.acl``) may not do."""
        callbacks: dict[str, object] = self._callbacks or {}
        if queue and queue not in callbacks and callbacks:
            queue = next(iter(callbacks))
        super()._deliver(message, queue)


class SentinelChannel(Channel, redis.SentinelChannel):
    """kombu's Sentinel channel (it asks the sentinels for the primary), with ``QoS``.

    Its connections keep asking the sentinels for a primary for ``FAILOVER_WAIT`` seconds
    before they give up (``MasterNotFoundError``): while a failover is under way there is
    none. Celery's consumer would otherwise sleep 2, 4, 6... seconds between attempts to
    reconnect (``Connection.ensure_connection``'s defaults, which Celery does not expose)
    and find the new primary up to that long after it was promoted.
    """

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)
        backoff = ExponentialBackoff(cap=FAILOVER_POLL, base=0.05)
        params["retry"] = Retry(backoff, retries=int(FAILOVER_WAIT / FAILOVER_POLL))
        return params


class SentinelTransport(Transport, redis.SentinelTransport):
    """``Transport``'s acks, BRPOP wait and delivery over kombu's Sentinel transport."""

    Channel = SentinelChannel
