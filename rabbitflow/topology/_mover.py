"""Moving every message of one queue to another: confirm, then ack.

Each message is consumed from the source, published to the target through the default
exchange on a channel with publisher confirms, and acked on the source only once the broker
has confirmed the copy. A mover killed at any point leaves each message in the source
(unacked, so the broker gives it back) or in both (confirmed, not yet acked): nothing is
lost, and what is copied twice is at most the prefetch. The copy keeps the body and every
property (headers, message id, correlation id, timestamp...); ``x-delivery-count``, which a
quorum queue adds to what it delivers, is left out: the target counts its own deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from rabbitflow.connection import underlay
from rabbitflow.errors import BrokerError

BasicProperties = Basic.Properties

# Deliveries in flight: enough to keep the confirms pipelined, small enough that what a kill
# can copy twice stays small.
PREFETCH = 1000
_DROPPED_HEADERS = frozenset({"x-delivery-count"})
_POLL = 0.2


@dataclass(slots=True)
class Moved:
    """What one move did: messages copied and how long it took."""

    messages: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


async def depth(connection: AbstractConnection, queue: str) -> int | None:
    """Ready messages of ``queue`` by a passive declare; None when it does not exist."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
    return int(declared.declaration_result.message_count or 0)


async def move(
    connection: AbstractConnection,
    source: str,
    target: str,
    *,
    prefetch: int = PREFETCH,
    progress: Callable[[int], None] | None = None,
) -> Moved:
    """Move every message of ``source`` to ``target`` until ``source`` is empty.

    Other consumers of ``source`` may keep taking messages meanwhile; the move ends when the
    source has no ready message and nothing of ours is in flight. Raises
    :class:`BrokerError` when the broker refuses a copy."""
    started = time.monotonic()
    amqp = underlay(connection)
    # The AMQP client itself: each delivery's properties are published again as they are,
    # and the confirms are awaited together (the per-message path of a migration).
    consuming = await amqp.channel(publisher_confirms=False)
    publishing = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    await consuming.basic_qos(prefetch_count=prefetch)
    moved = Moved()
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    async def forward(message: DeliveredMessage) -> None:
        tag = message.delivery_tag
        assert tag is not None
        try:
            await publishing.basic_publish(
                message.body,
                routing_key=target,
                properties=_properties(message.header.properties),
                mandatory=True,
            )
        except Exception as exc:
            failures.append(exc)
            with contextlib.suppress(Exception):
                await consuming.basic_nack(tag, requeue=True)
            return
        await consuming.basic_ack(tag)
        moved.messages += 1
        if progress is not None:
            progress(moved.messages)

    async def on_message(message: DeliveredMessage) -> None:
        task = asyncio.create_task(forward(message))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    consumer = await consuming.basic_consume(source, on_message)
    try:
        empty_polls = 0
        while empty_polls < 2:
            await asyncio.sleep(_POLL)
            if failures:
                raise BrokerError(
                    f"copying a message of {source!r} to {target!r} failed: {failures[0]!r}",
                    doing="moving messages",
                )
            count = await depth(connection, source)
            empty = (count == 0 or count is None) and not in_flight
            empty_polls = empty_polls + 1 if empty else 0
    finally:
        with contextlib.suppress(Exception):
            await consuming.basic_cancel(str(consumer.consumer_tag))
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        for channel in (consuming, publishing):
            with contextlib.suppress(Exception):
                await channel.close()
    moved.seconds = time.monotonic() - started
    return moved


def _properties(properties: BasicProperties) -> BasicProperties:
    headers = properties.headers
    if not headers or not _DROPPED_HEADERS.intersection(headers):
        return properties
    copied = copy.copy(properties)
    copied.headers = {k: v for k, v in headers.items() if k not in _DROPPED_HEADERS}
    return copied
