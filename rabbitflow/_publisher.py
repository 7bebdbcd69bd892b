"""Publishing with publisher confirms: a publish returns only once the broker has the message."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.abc import AbstractChannel
from pamqp import commands as spec

from rabbitflow._border import LOST, NACKED, publish_error
from rabbitflow._payload import encode
from rabbitflow._tracing import get_tracing
from rabbitflow.errors import PublishError

if TYPE_CHECKING:
    from aiormq.abc import ChannelFrame

PERSISTENT = 2
# A publish not confirmed within this long fails; a retired channel is closed after it at most.
PUBLISH_TIMEOUT = 30.0
# Fresh channels after refusals (see Publisher.renew): at most one per this many seconds.
RENEW_INTERVAL = 5.0


class Publisher:
    """Publishes on one confirm-mode channel; many publishes may await their confirms at once."""

    __slots__ = ("_lock", "_renewed_at", "_retired", "channel", "connection")

    def __init__(self, connection: aiormq.abc.AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._lock = asyncio.Lock()
        self._renewed_at = 0.0
        self._retired: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, connection: aiormq.abc.AbstractConnection) -> Publisher:
        return cls(connection, await cls._new_channel(connection))

    @staticmethod
    async def _new_channel(
        connection: aiormq.abc.AbstractConnection, avoid: int | None = None
    ) -> AbstractChannel:
        # on_return_raises: a mandatory publish that no queue accepts fails instead of
        # being confirmed (RabbitMQ confirms returned messages too).
        number = None if avoid is None else _free_number(connection, avoid)
        channel = await connection.channel(number, publisher_confirms=True, on_return_raises=True)
        channel.write_queue = _ClosingGuard(channel.write_queue)  # type: ignore[attr-defined]
        return channel

    @property
    def is_open(self) -> bool:
        return not self.connection.is_closed

    async def _reopen(self) -> None:
        # Publishing to a missing exchange makes the broker close the channel (404); the
        # connection survives, so the next publish gets a fresh channel. One reopen at a
        # time: every publish that found the channel closed waits for the same new one.
        # The old number is not reused: frames of the old channel still in the client's
        # write queue would reach the broker on the new one, and a frame on a channel the
        # broker has closed, before its channel.open, closes the whole connection
        # (504 CHANNEL_ERROR - expected 'channel.open').
        old = self.channel
        async with self._lock:
            if self.channel is old and old.is_closed and not self.connection.is_closed:
                self.channel = await self._new_channel(self.connection, avoid=old.number)

    async def renew(self) -> None:
        """Publish on a fresh channel from now on (at most every ``RENEW_INTERVAL`` seconds);
        the old one closes once its pending confirms are in.

        RabbitMQ 3.10 keeps refusing a channel's publishes to a quorum queue that refused
        it once (``reject-publish``) until that queue, limit still in place, drains below its
        soft limit: clearing the limit's policy does not release the channel, while a new
        channel is accepted at once (measured on 3.10.8; 4.0 and 4.3 release the old one)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._renewed_at < RENEW_INTERVAL:
            return
        old = self.channel
        async with self._lock:
            if self.channel is not old or old.is_closed or self.connection.is_closed:
                return
            self._renewed_at = loop.time()
            self.channel = await self._new_channel(self.connection, avoid=old.number)
        task = loop.create_task(_close_when_confirmed(old))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        mandatory: bool = True,
        timeout: float | None = 30.0,
    ) -> None:
        """Publish raw bytes and wait for the broker's confirm."""
        try:
            if self.channel.is_closed or self._lock.locked():
                await self._reopen()
            result = await self.channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                timeout=timeout,
            )
        except (*LOST, TimeoutError) as exc:
            raise publish_error(exc, exchange, routing_key) from None
        if isinstance(result, spec.Basic.Nack):
            raise PublishError(exchange, routing_key, NACKED)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        priority: int | None = None,
        expiration: int | None = None,
        reply_to: str | None = None,
        timeout: float | None = 30.0,
    ) -> str:
        """Encode ``payload`` and publish it; return its ``message_id``."""
        body, detected = encode(payload)
        message_id = message_id or uuid.uuid4().hex
        properties = spec.Basic.Properties(
            content_type=content_type or detected,
            delivery_mode=PERSISTENT if persistent else 1,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=headers or None,
            priority=priority,
            expiration=str(expiration) if expiration is not None else None,
            reply_to=reply_to,
        )
        tracing = get_tracing()
        if tracing.tracer is None:
            await self.send(
                exchange, routing_key, body, properties, mandatory=mandatory, timeout=timeout
            )
            return message_id
        traced = dict(headers or {})
        with tracing.publish_span(exchange, routing_key, traced, message_id):
            properties.headers = traced
            await self.send(
                exchange, routing_key, body, properties, mandatory=mandatory, timeout=timeout
            )
        return message_id

    async def close(self) -> None:
        if not self.channel.is_closed:
            await self.channel.close()

    async def ready_channel(self) -> AbstractChannel:
        """The confirm-mode channel, reopened first if the broker closed it."""
        if self.channel.is_closed or self._lock.locked():
            await self._reopen()
        return self.channel


def copy_properties(props: spec.Basic.Properties, headers: dict[str, Any]) -> spec.Basic.Properties:
    """The wire properties of a persistent copy of a received message, with ``headers``.

    The one place where a copy's fields are chosen, for retries, dead letters, deferrals and
    DLQ replays alike (``props`` is a delivery's ``header.properties`` or an aio-pika
    message's ``properties``). ``headers`` replaces the original's: each caller decides what
    a copy carries (failure headers, a reset attempt, no broker ``x-`` headers).

    Not copied:

    - ``expiration``: a per-message TTL runs again from the moment a copy is published, and
      RabbitMQ expires a message at the head of a queue once its TTL is over, so a copy could
      vanish (or be dead-lettered as ``expired``) while it waits in a retry tier or a DLQ.
      RabbitMQ itself removes it when it dead-letters a message for the same reason.
    - ``user_id``: RabbitMQ validates it against the user of the publishing connection and
      refuses the publish (406 PRECONDITION_FAILED) when they differ, which they do when the
      original was sent by another service's user."""
    return spec.Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers,
        delivery_mode=PERSISTENT,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=props.message_id,
        timestamp=props.timestamp,
        message_type=props.message_type,
        app_id=props.app_id,
    )


async def _close_when_confirmed(channel: AbstractChannel) -> None:
    """Close a retired publishing channel once the broker answered its last publish."""
    confirmations: dict[int, object] = getattr(channel, "confirmations", {})
    for _ in range(round(PUBLISH_TIMEOUT / 0.1)):
        if not confirmations or channel.is_closed:
            break
        await asyncio.sleep(0.1)
    with contextlib.suppress(Exception):
        if not channel.is_closed:
            await channel.close()


class _ClosingGuard:
    """The write queue of one publishing channel, shut to frames once its close-ok is queued.

    When the broker closes a channel (a publish to a missing exchange: 404), aiormq answers
    close-ok through ``put_nowait``, while publishes already waiting for the channel's lock
    go on queueing their frames behind it. A frame on a channel the broker has closed is a
    connection error (504 CHANNEL_ERROR - expected 'channel.open'): every consumer of the
    connection would lose its deliveries in hand. Frames after the close-ok are dropped
    here instead; their confirms fail with the channel, so those copies are not lost but
    published again, and the connection lives on."""

    __slots__ = ("_queue", "closed")

    def __init__(self, queue: asyncio.Queue[ChannelFrame]) -> None:
        self._queue = queue
        self.closed = False

    def put_nowait(self, frame: ChannelFrame) -> None:
        # aiormq queues a channel's frames with put_nowait only for the close-ok.
        self.closed = True
        self._queue.put_nowait(frame)

    async def put(self, frame: ChannelFrame) -> None:
        if self.closed:
            frame.drain()  # never sent: release a publish waiting for its write
            return
        await self._queue.put(frame)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def _free_number(connection: aiormq.abc.AbstractConnection, avoid: int) -> int:
    """A channel number in use by no channel of ``connection`` and other than ``avoid``."""
    used = set(connection.channels) | {avoid}
    number = avoid + 1
    while number in used:
        number += 1
    # RabbitMQ's default channel_max is 2047; wrap to the lowest free number past it.
    if number > 2047:
        number = next(n for n in range(1, 2048) if n not in used)
    return number
