"""Publishing with publisher confirms: a publish returns only once the broker has the message."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.abc import AbstractChannel
from pamqp import commands as spec

from rabbitflow._border import LOST, NACKED, publish_error
from rabbitflow._payload import encode
from rabbitflow._tracing import get_tracing
from rabbitflow.errors import FrameTooLarge, PublishError

if TYPE_CHECKING:
    from aiormq.abc import ChannelFrame

PERSISTENT = 2
TRANSIENT = 1
# The content-header frame around a message's properties: type, channel and size (7 bytes),
# class id, weight and body size (12), frame end (1). The body travels in frames of its own,
# split by the client, so this is the one frame a message's size can push over frame_max.
# RabbitMQ answers a larger frame with a connection error (FRAME_ERROR -
# {frame_too_large,Size,Limit}, both counted without the 8 bytes of header and end): every
# channel of the connection closes, with every delivery in hand on it. RabbitMQ lets 8 bytes
# more through, for clients that leave the header and end out of their count (measured on
# 3.10.8, 4.0.5 and 4.3.6); rabbitflow keeps to the AMQP limit.
HEADER_FRAME_OVERHEAD = 20

# A header that may be cut, and its cutter: the value cut to at most n bytes, or None to drop it.
Trim = tuple[str, Callable[[str, int], str | None]]


def header_frame_size(properties: spec.Basic.Properties) -> int:
    """Bytes of the content-header frame that carries ``properties``, headers included."""
    return HEADER_FRAME_OVERHEAD + len(properties.marshal())


# Every property but the headers at its largest: the flags (2 bytes), timestamp (8),
# delivery_mode and priority (1 each), and ten short strings of at most 255 bytes, each
# after a length byte (pamqp refuses a longer one).
_SHORT_STRINGS = sum(
    1
    for name in spec.Basic.Properties.__slots__
    if spec.Basic.Properties.amqp_type(name) == "shortstr"
)
_PROPERTIES_BOUND = HEADER_FRAME_OVERHEAD + 2 + 8 + 1 + 1 + 256 * _SHORT_STRINGS
# More than any frame: a value the bound does not know sends fit() to the exact size.
_UNKNOWN = 1 << 40


def frame_bound(properties: spec.Basic.Properties) -> int:
    """At least :func:`header_frame_size`, for a fraction of its cost (pamqp's encoder
    takes some 30 µs for a few headers, this 1-2 µs): the other properties at their
    largest, the headers exact for text, a bound above for numbers and the like, and a huge
    number for a type it does not know."""
    headers = properties.headers
    return _PROPERTIES_BOUND + (_table_bound(headers) if headers is not None else 0)


def _table_bound(table: dict[str, Any]) -> int:
    size = 4
    for key, value in table.items():
        size += 1 + len(key.encode()) + _value_bound(value)
    return size


def _value_bound(value: object) -> int:
    if isinstance(value, str):
        return 5 + len(value.encode())
    if isinstance(value, bool | None):
        return 2
    if isinstance(value, int | float):
        return 9
    if isinstance(value, bytearray):
        return 5 + len(value)
    if isinstance(value, dict):
        return 1 + _table_bound(value)
    if isinstance(value, list):
        return 5 + sum(_value_bound(item) for item in value)
    return 9 if isinstance(value, Decimal | datetime) else _UNKNOWN


def fit(
    properties: spec.Basic.Properties,
    frame_max: int,
    trims: Sequence[Trim] = (),
    *,
    exchange: str = "",
    routing_key: str = "",
) -> int:
    """Make ``properties`` fit in one frame of ``frame_max`` bytes; return the bytes trimmed.

    The one size check of every message rabbitflow builds from another (retry, dead-letter and
    deferral copies, DLQ replays, error replies). When the frame would be too large, the
    headers named in ``trims`` are cut in that order, each by its cutter (which keeps as many
    bytes as it is given, or drops the header), or removed when nothing of them fits;
    :class:`FrameTooLarge` when the frame is still too large without them. ``frame_max`` 0
    means no limit (AMQP)."""
    if not frame_max or frame_bound(properties) <= frame_max:
        return 0
    size = header_frame_size(properties)
    if size <= frame_max:
        return 0
    headers = properties.headers or {}
    first = size
    for name, cut in trims:
        value = headers.get(name)
        if not isinstance(value, str):
            continue
        # A long string's length prefix is fixed: cutting n bytes of it saves n bytes.
        keep = len(value.encode("utf-8", "replace")) - (size - frame_max)
        shorter = cut(value, keep) if keep > 3 else None
        if shorter is None:
            del headers[name]
        else:
            headers[name] = shorter
        size = header_frame_size(properties)
        if size <= frame_max:
            return first - size
    raise FrameTooLarge(exchange, routing_key, size, frame_max)


# A publish not confirmed within this long fails; a retired channel is closed after it at most.
PUBLISH_TIMEOUT = 30.0
# Fresh channels after refusals (see Publisher.renew): at most one per this many seconds.
RENEW_INTERVAL = 5.0


class Publisher:
    """Publishes on one confirm-mode channel; many publishes may await their confirms at once."""

    __slots__ = ("_lock", "_renewed_at", "_retired", "channel", "connection", "frame_max")

    def __init__(self, connection: aiormq.abc.AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._lock = asyncio.Lock()
        # Negotiated once per connection (connection.tune): the largest frame either side
        # accepts. Every channel of the connection shares it.
        self.frame_max: int = connection.connection_tune.frame_max
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

    async def send_fitted(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        trims: Sequence[Trim] = (),
        *,
        mandatory: bool = True,
        timeout: float | None = 30.0,
    ) -> int:
        """:meth:`send` once ``properties`` fit in a frame (see :func:`fit`); the bytes
        trimmed, or :class:`FrameTooLarge` before anything is sent."""
        trimmed = fit(properties, self.frame_max, trims, exchange=exchange, routing_key=routing_key)
        await self.send(
            exchange, routing_key, body, properties, mandatory=mandatory, timeout=timeout
        )
        return trimmed

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
        properties = message_properties(
            content_type or detected,
            persistent=persistent,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=headers,
            priority=priority,
            expiration=expiration,
            reply_to=reply_to,
        )
        tracing = get_tracing()
        if tracing.tracer is None:
            if headers:
                # Headers that do not fit in a frame would close the connection, and every
                # delivery in hand on it: FrameTooLarge here instead, before anything is sent.
                fit(properties, self.frame_max, exchange=exchange, routing_key=routing_key)
            await self.send(
                exchange, routing_key, body, properties, mandatory=mandatory, timeout=timeout
            )
            return message_id
        traced = dict(headers or {})
        with tracing.publish_span(exchange, routing_key, traced, message_id):
            properties.headers = traced
            fit(properties, self.frame_max, exchange=exchange, routing_key=routing_key)
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


def message_properties(
    content_type: str | None,
    *,
    persistent: bool = True,
    message_id: str | None = None,
    correlation_id: str | None = None,
    headers: dict[str, Any] | None = None,
    priority: int | None = None,
    expiration: int | None = None,
    reply_to: str | None = None,
) -> spec.Basic.Properties:
    """The wire properties of a new message: every field rabbitflow publishes, mapped to AMQP
    in one place (publishes, batches, RPC replies, stored offsets and schedule ticks).

    A copy of a received message gets its properties from :func:`copy_properties` instead.
    ``expiration`` is in milliseconds: AMQP carries it as a short string, and RabbitMQ refuses
    any other text (406 PRECONDITION_FAILED). Empty ``headers`` are sent as none."""
    return spec.Basic.Properties(
        content_type=content_type,
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
        message_id=message_id,
        correlation_id=correlation_id,
        headers=headers or None,
        priority=priority,
        expiration=str(expiration) if expiration is not None else None,
        reply_to=reply_to,
    )


def copy_properties(
    props: spec.Basic.Properties, headers: dict[str, Any], *, expiration: int | None = None
) -> spec.Basic.Properties:
    """The wire properties of a persistent copy of a received message, with ``headers``.

    The one place where a copy's fields are chosen, for retries, dead letters, deferrals and
    DLQ replays alike (``props`` is a delivery's ``header.properties`` or an aio-pika
    message's ``properties``). ``headers`` replaces the original's: each caller decides what
    a copy carries (failure headers, a reset attempt, no broker ``x-`` headers).

    Not copied:

    - ``expiration``: a per-message TTL runs again from the moment a copy is published, and
      RabbitMQ expires a message at the head of a queue once its TTL is over, so a copy could
      vanish (or be dead-lettered as ``expired``) while it waits in a retry tier or a DLQ.
      RabbitMQ itself removes it when it dead-letters a message for the same reason. A
      deferral's last hop sets its own (``expiration``, milliseconds): the wait left.
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
        expiration=None if expiration is None else str(expiration),
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
