"""The RabbitMQ version a connection reached, and every behaviour that depends on it.

Anything rabbitflow does differently between RabbitMQ releases is decided here, from the
``version`` the server announces in ``connection.start``, so that the rest of the code asks
a question ("do requeued messages return to the head?") instead of comparing numbers.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The topology commands read versions without a connection (validate --broker-version):
    # the client is imported only where a connection is at hand.
    from aio_pika.abc import AbstractConnection

OLDEST_SUPPORTED = (3, 10)
_NUMBERS = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, slots=True, order=True)
class BrokerVersion:
    """``major.minor.patch`` of a RabbitMQ server; comparable with ``>=``."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> BrokerVersion | None:
        """``"4.0.5"``, ``"3.10.7"``, ``"3.13.0-rc.1"``; None when it is not a version."""
        match = _NUMBERS.match(text.strip())
        if match is None:
            return None
        return cls(int(match[1]), int(match[2]), int(match[3] or 0))

    @classmethod
    def of(cls, connection: AbstractConnection) -> BrokerVersion | None:
        """The version the broker of an open connection announced (None if it did not)."""
        from rabbitflow.connection import underlay

        return cls.from_properties(underlay(connection).server_properties)

    @classmethod
    def from_properties(cls, properties: dict[str, Any] | None) -> BrokerVersion | None:
        """From ``connection.start``'s server properties."""
        value = (properties or {}).get("version")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return cls.parse(value) if isinstance(value, str) else None

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def at_least(self, major: int, minor: int = 0) -> bool:
        return (self.major, self.minor) >= (major, minor)

    @property
    def supported(self) -> bool:
        """3.10 or later: quorum-queue at-least-once dead-lettering needs 3.10."""
        return self.at_least(*OLDEST_SUPPORTED)

    @property
    def requeue_to_head(self) -> bool:
        """Quorum queues put a requeued message back at the head (4.0+) or the tail (3.x)."""
        return self.at_least(4, 0)

    @property
    def counts_first_delivery(self) -> bool:
        """Quorum queues send ``x-delivery-count: 0`` on a first ``basic.get`` before 3.12 (a
        consumer's first delivery has none, measured on 3.10.8); from 3.12 the header is
        absent until the message was returned once."""
        return not self.at_least(3, 12)

    @property
    def default_delivery_limit(self) -> int | None:
        """The delivery limit a quorum queue gets without ``x-delivery-limit``: 20 from 4.0 (a
        message returned more often is dropped or dead-lettered), none before."""
        return 20 if self.at_least(4, 0) else None

    @property
    def nack_counts(self) -> bool:
        """Whether ``basic.nack(requeue=True)`` counts toward a quorum queue's delivery limit.

        Before 4.3 every return counts (nack, reject, a channel or connection closed with the
        delivery unacked). From 4.3 (rabbitmq-server#15387) a nack returns a message without
        counting it: only ``basic.reject`` and deliveries lost with their channel count, in
        ``x-delivery-count``, and ``x-acquired-count`` counts every delivery. Measured on
        3.10.8, 4.0.5 and 4.3.6 (docs/recoverability.md)."""
        return not self.at_least(4, 3)

    @property
    def counts_acquisitions(self) -> bool:
        """Quorum deliveries carry ``x-acquired-count`` (every earlier delivery) from 4.3."""
        return self.at_least(4, 3)

    @property
    def cancels_timed_out_consumers(self) -> bool:
        """A quorum consumer past its ``consumer_timeout`` gets ``basic.cancel`` from 4.3 (its
        unacked deliveries go back uncounted, the channel stays open); before, the broker
        closes the whole channel."""
        return self.at_least(4, 3)

    @property
    def accepts_transient_queues(self) -> bool:
        """Non-durable, non-exclusive queues: deprecated in 4.0 (logged), refused from 4.3."""
        return not self.at_least(4, 3)

    @property
    def accepts_global_qos(self) -> bool:
        """``basic.qos`` with ``global=true``: deprecated in 4.0, refused from 4.3."""
        return not self.at_least(4, 3)

    # Consumer timeouts. Before 4.3 the channel checks every unacked delivery once per tick
    # (60 s by default) against the broker-wide consumer_timeout, or from 3.12 the queue's
    # x-consumer-timeout / consumer-timeout policy, and closes the channel (406). From 4.3
    # the queue checks its own deliveries: only quorum queues do, at the exact moment, and
    # the channel sends basic.cancel to a client with consumer_cancel_notify instead of
    # closing; classic queues and streams never time a consumer out and refuse the argument
    # (on queue.declare and on basic.consume alike).

    def consumer_timeout_applies(self, queue_type: str) -> bool:
        """Whether a consumer of a ``queue_type`` queue can be timed out at all."""
        return queue_type == "quorum" or not self.at_least(4, 3)

    def accepts_consumer_timeout(self, queue_type: str) -> bool:
        """Whether ``x-consumer-timeout`` may be declared on a ``queue_type`` queue (3.10 and
        3.11 accept and keep it without enforcing it)."""
        return self.consumer_timeout_applies(queue_type)

    @property
    def enforces_queue_consumer_timeout(self) -> bool:
        """A queue's ``x-consumer-timeout`` (or policy) is enforced from 3.12."""
        return self.at_least(3, 12)

    def consumer_timeout_on_consume(self, queue_type: str) -> bool:
        """``x-consumer-timeout`` as a ``basic.consume`` argument: quorum queues, from 4.3 (older
        brokers accept and ignore it)."""
        return queue_type == "quorum" and self.at_least(4, 3)


class Returns(enum.Enum):
    """What giving a delivery back to its queue costs it, by queue type and version."""

    #: Nothing counts returns (classic queues and streams have no delivery limit).
    FREE = "free"
    #: A quorum queue on RabbitMQ 4.3+: ``basic.nack`` is free; ``basic.reject`` and a
    #: channel or connection closed with the delivery unacked count.
    NACK_FREE = "nack-free"
    #: A quorum queue before RabbitMQ 4.3: every return counts toward the delivery limit.
    COUNTED = "counted"

    @classmethod
    def of(cls, queue_type: str, version: BrokerVersion | None) -> Returns:
        """For a queue of ``queue_type`` on ``version`` (unknown: assume every return counts)."""
        if queue_type != "quorum":
            return cls.FREE
        return cls.COUNTED if version is None or version.nack_counts else cls.NACK_FREE


def describe(version: BrokerVersion | None) -> str:
    """For logs: ``"4.0.5"``, or ``"unknown"``."""
    return "unknown" if version is None else str(version)
