"""Whether reading a queue costs its messages a delivery, and what the console does about it.

RabbitMQ 4 gives every quorum queue a delivery limit of 20 unless the queue or a policy sets
one: each time a message is delivered and handed back (a channel closed with it unacked, as
every non-destructive read does) counts, and at the limit the broker dead-letters the message,
or deletes it when the queue has no dead-letter exchange, as a ``Q.dlq`` has. Measured on
4.0.5: ``rabbitflow.dlq.peek`` of a quorum DLQ declared without ``x-delivery-limit`` finds it
empty on the 21st read; with ``x-delivery-limit = -1`` the message is still there after 25.
RabbitMQ 3.x counts the deliveries (``x-delivery-count``) but has no default limit. From
RabbitMQ 4.3 a ``basic.nack`` with requeue is not counted, and rabbitflow's reads give
messages back that way (docs/recoverability.md): reads are free again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aio_pika.abc import AbstractConnection

from rabbitflow._broker_version import BrokerVersion

DEFAULT_LIMIT = 20
DELIVERY_COUNT = "x-delivery-count"


def broker_version(connection: AbstractConnection) -> BrokerVersion | None:
    """The version of the connected RabbitMQ (None when the server does not say)."""
    if connection.transport is None:
        return None
    return BrokerVersion.of(connection)


def reads_are_counted(
    version: BrokerVersion | None, queue_type: str, arguments: Mapping[str, Any]
) -> bool:
    """Whether reading a queue of this type and these arguments brings its messages closer to
    RabbitMQ 4's default delivery limit: 4.0 to 4.2, where every return counts."""
    return (
        version is not None
        and version.major >= 4
        and version.nack_counts
        and queue_type == "quorum"
        and "x-delivery-limit" not in arguments
    )


def reads_left(headers: Mapping[str, Any]) -> int:
    """How many more reads a message of such a queue survives."""
    count = headers.get(DELIVERY_COUNT, 0)
    spent = count if isinstance(count, int) and not isinstance(count, bool) else 0
    return max(DEFAULT_LIMIT - spent, 0)
