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
import time
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from rabbitflow.errors import BrokerError

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
    consuming = await connection.channel(publisher_confirms=False)
    publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await consuming.set_qos(prefetch_count=prefetch)
    moved = Moved()
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []
    exchange = publishing.default_exchange

    async def forward(message: AbstractIncomingMessage) -> None:
        try:
            await exchange.publish(_copy(message), routing_key=target, mandatory=True)
        except Exception as exc:
            failures.append(exc)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        await message.ack()
        moved.messages += 1
        if progress is not None:
            progress(moved.messages)

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(forward(message))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    queue = await consuming.get_queue(source, ensure=False)
    tag = await queue.consume(on_message)
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
            empty_polls = empty_polls + 1 if (count == 0 or count is None) and not in_flight else 0
    finally:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        for channel in (consuming, publishing):
            with contextlib.suppress(Exception):
                await channel.close()
    moved.seconds = time.monotonic() - started
    return moved


def _copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    headers = {k: v for k, v in (message.headers or {}).items() if k not in _DROPPED_HEADERS}
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode or aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )
