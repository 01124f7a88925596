"""kombu's Redis transport, minus the acknowledgement of messages nobody needs to ack.

The worker consumes its queues with ``no_ack`` (see ``celery_app``), so no message is ever
in kombu's unacked index. Celery still acknowledges every task, and kombu's Redis QoS
answers each ack with a MULTI/ZREM/HDEL/EXEC round trip on the consumer thread: measured
at a third of the worker's CPU per tiny job. Here an ack of a message that was never
recorded as unacked costs nothing; everything else is kombu's own behaviour.
"""

from __future__ import annotations

from kombu.transport import redis

__all__ = ["Transport"]


class QoS(redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        if self._delivered is not None and delivery_tag in self._delivered:
            super().ack(delivery_tag)


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
