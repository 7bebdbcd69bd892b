"""Which process publishes a schedule: a lease held on RabbitMQ itself, no other server.

The lease is an exclusive queue, ``rabbitflow.schedule.<name>.lease``. RabbitMQ lets one
connection at a time declare an exclusive queue (any other gets RESOURCE_LOCKED) and deletes
it the moment that connection closes: at once when the process dies (the kernel closes its
socket), or after missed heartbeats when its host vanishes. Standby processes retry the
declare, so one of them holds the lease soon after.

The last tick published is kept in ``rabbitflow.schedule.<name>.last`` (durable, one
message), so a process that takes over neither repeats a tick already published nor skips
one that came due while no one held the lease.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import aiormq
import aiormq.abc
from pamqp import commands as spec

from rabbitflow._publisher import Publisher, message_properties

PREFIX = "rabbitflow.schedule."


def lease_queue(name: str) -> str:
    """``rabbitflow.schedule.<name>.lease``: exists while a process holds the lease."""
    return f"{PREFIX}{name}.lease"


def last_tick_queue(name: str) -> str:
    """``rabbitflow.schedule.<name>.last``: holds the last tick published."""
    return f"{PREFIX}{name}.last"


# A classic queue: reading the record (basic.get, then reject with requeue) must not count
# as a delivery, which quorum queues limit (RabbitMQ 4.0 drops a message after 20).
# x-max-length 1 with the default drop-head overflow keeps only the newest record.
_LAST_TICK_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic", "x-max-length": 1}


class Lease:
    """The right to publish the ticks of one schedule, on one connection."""

    __slots__ = ("_channel", "_connection", "name")

    def __init__(self, connection: aiormq.abc.AbstractConnection, name: str) -> None:
        self._connection = connection
        self._channel: aiormq.abc.AbstractChannel | None = None
        self.name = name

    async def _open(self) -> aiormq.abc.AbstractChannel:
        # A refused declare closes the channel: the next attempt needs a new one.
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def try_acquire(self) -> bool:
        """Take the lease if no other connection holds it."""
        channel = await self._open()
        try:
            await channel.queue_declare(lease_queue(self.name), exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:
            return False
        return True

    async def last_tick(self) -> datetime | None:
        """The tick last published by whoever held the lease; None before the first."""
        channel = await self._open()
        queue = last_tick_queue(self.name)
        await channel.queue_declare(queue, durable=True, arguments=_LAST_TICK_ARGUMENTS)
        got = await channel.basic_get(queue, no_ack=False)
        if not isinstance(got.delivery, spec.Basic.GetOk) or got.delivery.delivery_tag is None:
            return None
        # Put the record back where it was: the next holder reads it too.
        await channel.basic_reject(got.delivery.delivery_tag, requeue=True)
        try:
            return datetime.fromisoformat(json.loads(got.body)["tick"])
        except (ValueError, KeyError, TypeError):
            return None

    async def record(self, publisher: Publisher, tick: datetime) -> None:
        """Store ``tick`` as the last one published (confirmed before this returns)."""
        body = json.dumps({"schedule": self.name, "tick": tick.isoformat()}).encode()
        properties = message_properties("application/json")
        await publisher.send("", last_tick_queue(self.name), body, properties)
