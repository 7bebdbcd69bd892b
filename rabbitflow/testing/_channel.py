"""aiormq-shaped connection and channel objects on top of the in-memory broker.

They implement what rabbitflow calls on an aiormq channel (publish with confirms and returns,
qos, consume, get, ack/nack/reject, cancel, close), with the same results and exceptions, so
rabbitflow's real ``Publisher``, ``Acker`` and ``Dispatcher`` run on them unchanged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiormq.exceptions as amqp_errors
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from rabbitflow._broker_version import BrokerVersion
from rabbitflow.testing._envelope import Envelope, roundtrip
from rabbitflow.testing._queue import Consumer, MemoryQueue

if TYPE_CHECKING:
    from rabbitflow.testing._broker import MemoryBroker

FRAME_MAX = 131072

ConsumerCallback = Callable[[DeliveredMessage], Awaitable[Any]]
NO_ROUTE = 312
# Direct reply-to: the pseudo-queue a requester consumes from, and the prefix of the address
# RabbitMQ writes into the reply_to of its requests.
REPLY_TO = "amq.rabbitmq.reply-to"
REPLY_PREFIX = REPLY_TO + "."


@dataclass(eq=False, slots=True)
class _Unacked:
    queue: MemoryQueue
    envelope: Envelope
    consumer: Consumer | None
    at: float = 0.0  # virtual ms of the delivery


class MemoryConnection:
    """What ``aiormq.Connection`` offers rabbitflow: channels, ``is_closed``, ``close()``."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.channels: list[MemoryChannel] = []
        # RabbitMQ's default frame_max, as a real connection negotiates it: rabbitflow fits
        # the copies it builds into it (rabbitflow._publisher.fit).
        self.connection_tune = spec.Connection.Tune(frame_max=FRAME_MAX)
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def is_closed(self) -> bool:
        return self.closing.done()

    @property
    def server_properties(self) -> dict[str, Any]:
        """What ``connection.start`` announces: the RabbitMQ version the broker behaves like."""
        return {"product": "RabbitMQ", "version": str(self.broker.version)}

    async def channel(
        self,
        channel_number: int | None = None,
        publisher_confirms: bool = True,
        frame_size: int | None = None,
        timeout: float | None = None,
        on_return_raises: bool = True,
        **kwargs: Any,
    ) -> MemoryChannel:
        """Open a channel; ``on_return_raises`` as in aiormq: a returned publish raises."""
        if self.is_closed:
            raise amqp_errors.ConnectionClosed(320, "connection closed")
        channel = MemoryChannel(self, len(self.channels) + 1, publisher_confirms, on_return_raises)
        self.channels.append(channel)
        return channel

    async def close(self, exc: BaseException | None = None) -> None:
        for channel in self.channels:
            channel.shut(None)
        if not self.closing.done():
            self.closing.set_result(None)


class MemoryChannel:
    """One AMQP channel: its delivery tags, unacked deliveries, prefetch and consumers."""

    def __init__(
        self,
        connection: MemoryConnection,
        number: int,
        publisher_confirms: bool,
        on_return_raises: bool,
    ) -> None:
        self.connection = connection
        self.broker = connection.broker
        self.number = number
        self.publisher_confirms = publisher_confirms
        self.on_return_raises = on_return_raises
        self.on_return_callbacks: set[Callable[[DeliveredMessage], Any]] = set()
        self.on_consumer_cancel_callbacks: set[Callable[[Any], Any]] = set()
        self.consumers: dict[str, Consumer] = {}
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unacked: dict[int, _Unacked] = {}
        # Deliveries given back by a consumer timeout (4.3+), whose tags may still be acked.
        self._timed_out: dict[int, _Unacked] = {}
        self._delivery_tag = 0
        self._publish_tag = 0
        self._prefetch = 0
        self._global_prefetch = 0
        self._reply_consumer: Consumer | None = None
        self.reply_address: str | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self.closing.done()

    def _check_open(self) -> None:
        if self.is_closed:
            raise amqp_errors.ChannelInvalidStateError(f"channel {self.number} is closed")

    def has_capacity(self) -> bool:
        return not self._global_prefetch or len(self._unacked) < self._global_prefetch

    def fail(self, error: amqp_errors.AMQPError) -> None:
        """Close the channel as the broker does on a channel error, and remember the error."""
        self.broker.errors.append(error)
        self.shut(error)

    def shut(self, error: BaseException | None) -> None:
        """Close: cancel the consumers and return every unacked delivery to its queue."""
        if self.is_closed:
            return
        for consumer in list(self.consumers.values()):
            self.broker.remove_consumer(consumer)
        self.consumers.clear()
        self._stop_replies()
        unacked, self._unacked = self._unacked, {}
        self.broker.settle(
            [(entry.queue, entry.envelope, True) for entry in unacked.values()], returned=True
        )
        if error is None:
            self.closing.set_result(None)
        else:
            self.closing.set_exception(error)
            self.closing.exception()  # retrieved: nobody has to await a closed channel

    async def close(self, exc: BaseException | None = None, timeout: float | None = None) -> None:
        self.shut(None)

    # -- publishing --------------------------------------------------------------------------

    async def basic_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: spec.Basic.Properties | None = None,
        mandatory: bool = False,
        immediate: bool = False,
        timeout: float | None = None,
        wait: bool = True,
    ) -> spec.Basic.Ack | spec.Basic.Nack | None:
        """Route a message; in confirm mode return ``Basic.Ack`` like aiormq, or raise
        ``PublishError`` (returned, with ``on_return_raises``) / ``DeliveryError`` (nacked)."""
        self._check_open()
        properties = properties or spec.Basic.Properties(delivery_mode=1)
        if not properties.message_id:
            properties.message_id = uuid.uuid4().hex  # aiormq gives every publish an id
        stored = roundtrip(properties)
        if stored.reply_to == REPLY_TO:
            stored.reply_to = self._reply_address()
        self._check_exchange(exchange)
        if exchange == "" and routing_key.startswith(REPLY_PREFIX):
            return self._reply(routing_key, body, stored, mandatory)
        result = self.broker.publish(exchange, routing_key, body, stored, mandatory=mandatory)
        if result.returned:
            self._return(exchange, routing_key, body, stored)
        if not self.publisher_confirms:
            return None
        self._publish_tag += 1
        if result.rejected:
            raise amqp_errors.DeliveryError(None, spec.Basic.Nack(delivery_tag=self._publish_tag))
        return spec.Basic.Ack(delivery_tag=self._publish_tag)

    # -- direct reply-to ---------------------------------------------------------------------

    def _reply_address(self) -> str:
        """The address RabbitMQ puts in place of ``amq.rabbitmq.reply-to``: this channel's."""
        if self.reply_address is None:
            error = amqp_errors.ChannelPreconditionFailed(
                "PRECONDITION_FAILED - fast reply consumer does not exist"
            )
            self.fail(error)
            raise error
        return self.reply_address

    def _consume_replies(self, consumer: Consumer) -> None:
        if not consumer.no_ack:
            error = amqp_errors.ChannelPreconditionFailed(
                "PRECONDITION_FAILED - reply consumer cannot acknowledge"
            )
            self.fail(error)
            raise error
        self._reply_consumer = consumer
        self.reply_address = f"{REPLY_PREFIX}{uuid.uuid4().hex}"
        self.broker.reply_channels[self.reply_address] = self

    def _stop_replies(self) -> None:
        if self.reply_address is not None:
            self.broker.reply_channels.pop(self.reply_address, None)
        self._reply_consumer = None
        self.reply_address = None

    def _reply(
        self, address: str, body: bytes, properties: spec.Basic.Properties, mandatory: bool
    ) -> spec.Basic.Ack | None:
        # A reply goes straight to the requester's channel, or nowhere when it is gone. For the
        # mandatory flag RabbitMQ counts a reply-to address as no queue: a mandatory reply is
        # returned to its publisher even when it was delivered.
        target = self.broker.reply_channels.get(address)
        if target is not None:
            target.deliver_reply(address, body, properties)
        if mandatory:
            self._return("", address, body, properties)
        if not self.publisher_confirms:
            return None
        self._publish_tag += 1
        return spec.Basic.Ack(delivery_tag=self._publish_tag)

    def deliver_reply(self, address: str, body: bytes, properties: spec.Basic.Properties) -> None:
        """Push a reply to this channel's ``amq.rabbitmq.reply-to`` consumer (no ack)."""
        consumer = self._reply_consumer
        if consumer is None:
            return
        self._delivery_tag += 1
        frame = spec.Basic.Deliver(
            consumer_tag=consumer.tag,
            delivery_tag=self._delivery_tag,
            redelivered=False,
            exchange="",
            routing_key=address,
        )
        header = ContentHeader(body_size=len(body), properties=roundtrip(properties))
        message = DeliveredMessage(delivery=frame, header=header, body=body, channel=self)  # type: ignore[arg-type]
        self.broker.run(consumer.callback(message))

    def _check_exchange(self, name: str) -> None:
        if name == "":
            return
        exchange = self.broker.exchanges.get(name)
        if exchange is None:
            error: amqp_errors.AMQPError = amqp_errors.ChannelNotFoundEntity(
                f"NOT_FOUND - no exchange '{name}' in vhost '/'"
            )
        elif exchange.internal:
            error = amqp_errors.ChannelAccessRefused(
                f"ACCESS_REFUSED - cannot publish to internal exchange '{name}' in vhost '/'"
            )
        else:
            return
        self.fail(error)
        raise error

    def _return(
        self, exchange: str, routing_key: str, body: bytes, properties: spec.Basic.Properties
    ) -> None:
        frame = spec.Basic.Return(
            reply_code=NO_ROUTE, reply_text="NO_ROUTE", exchange=exchange, routing_key=routing_key
        )
        header = ContentHeader(body_size=len(body), properties=roundtrip(properties))
        message = DeliveredMessage(delivery=frame, header=header, body=body, channel=self)  # type: ignore[arg-type]
        if self.publisher_confirms and self.on_return_raises:
            raise amqp_errors.PublishError(message, frame)
        for callback in list(self.on_return_callbacks):
            callback(message)

    # -- consuming ---------------------------------------------------------------------------

    async def basic_qos(
        self,
        *,
        prefetch_size: int | None = None,
        prefetch_count: int | None = None,
        global_: bool = False,
        timeout: float | None = None,
    ) -> spec.Basic.QosOk:
        """``global_=False`` limits each consumer started afterwards; ``True`` the channel."""
        self._check_open()
        if global_:
            self._global_prefetch = prefetch_count or 0
            self.broker.pump_all()
        else:
            self._prefetch = prefetch_count or 0
        return spec.Basic.QosOk()

    async def basic_consume(
        self,
        queue: str,
        consumer_callback: ConsumerCallback,
        *,
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
        consumer_tag: str | None = None,
        timeout: float | None = None,
    ) -> spec.Basic.ConsumeOk:
        self._check_open()
        tag = consumer_tag or f"amq.ctag-{uuid.uuid4().hex}"
        if tag in self.consumers:
            raise amqp_errors.DuplicateConsumerTag(tag)
        consumer = Consumer(tag, queue, self, consumer_callback, no_ack, self._prefetch)
        if queue == REPLY_TO:
            self._consume_replies(consumer)
            self.consumers[tag] = consumer
            return spec.Basic.ConsumeOk(consumer_tag=tag)
        target = self._queue(queue)
        consumer.timeout_ms = _consumer_timeout(target, arguments)
        self.consumers[tag] = consumer
        self.broker.add_consumer(target, consumer)
        return spec.Basic.ConsumeOk(consumer_tag=tag)

    async def basic_cancel(
        self, consumer_tag: str, *, nowait: bool = False, timeout: float | None = None
    ) -> spec.Basic.CancelOk:
        """Stop deliveries to a consumer; what it holds stays unacked on this channel."""
        self._check_open()
        consumer = self.consumers.pop(consumer_tag, None)
        if consumer is not None and consumer is self._reply_consumer:
            self._stop_replies()
        elif consumer is not None:
            self.broker.remove_consumer(consumer)
        return spec.Basic.CancelOk(consumer_tag=consumer_tag)

    async def basic_get(
        self, queue: str = "", no_ack: bool = False, timeout: float | None = None
    ) -> DeliveredMessage:
        """One message from the head of ``queue`` (``Basic.GetEmpty`` when there is none)."""
        self._check_open()
        target = self._queue(queue)
        envelope = self.broker.take(target)
        if envelope is None:
            empty = spec.Basic.GetEmpty()
            return DeliveredMessage(delivery=empty, header=ContentHeader(), body=b"", channel=self)  # type: ignore[arg-type]
        tag = self._track(target, envelope, None, no_ack)
        frame = spec.Basic.GetOk(
            delivery_tag=tag,
            redelivered=envelope.redelivered,
            exchange=envelope.exchange,
            routing_key=envelope.routing_key,
            message_count=len(target.ready),
        )
        return self._message(frame, target, envelope)

    def _queue(self, name: str) -> MemoryQueue:
        target = self.broker.queues.get(name)
        if target is None:
            error = amqp_errors.ChannelNotFoundEntity(f"NOT_FOUND - no queue '{name}' in vhost '/'")
            self.fail(error)
            raise error
        return target

    def deliver(self, consumer: Consumer, queue: MemoryQueue, envelope: Envelope) -> None:
        """Push one message to ``consumer`` (called by the broker)."""
        tag = self._track(queue, envelope, consumer, consumer.no_ack)
        frame = spec.Basic.Deliver(
            consumer_tag=consumer.tag,
            delivery_tag=tag,
            redelivered=envelope.redelivered,
            exchange=envelope.exchange,
            routing_key=envelope.routing_key,
        )
        self.broker.run(consumer.callback(self._message(frame, queue, envelope)))

    def _track(
        self, queue: MemoryQueue, envelope: Envelope, consumer: Consumer | None, no_ack: bool
    ) -> int:
        self._delivery_tag += 1
        if not no_ack:
            at = self.broker.clock.now_ms()
            self._unacked[self._delivery_tag] = _Unacked(queue, envelope, consumer, at)
            queue.unacked += 1
            if consumer is not None:
                consumer.unacked += 1
        return self._delivery_tag

    def _message(
        self,
        frame: spec.Basic.Deliver | spec.Basic.GetOk,
        queue: MemoryQueue,
        envelope: Envelope,
    ) -> DeliveredMessage:
        properties = roundtrip(envelope.properties)
        if queue.kind == "quorum":
            _count_headers(properties, envelope, queue.version, isinstance(frame, spec.Basic.GetOk))
        header = ContentHeader(body_size=len(envelope.body), properties=properties)
        return DeliveredMessage(delivery=frame, header=header, body=envelope.body, channel=self)  # type: ignore[arg-type]

    # -- settling ----------------------------------------------------------------------------

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self._settle(delivery_tag, multiple, requeue=None)

    async def basic_nack(
        self,
        delivery_tag: int,
        multiple: bool = False,
        requeue: bool = True,
        wait: bool = True,
    ) -> None:
        # RabbitMQ 4.3+ does not count a nack toward the delivery limit (rabbitmq-server#15387).
        counted = self.broker.version.nack_counts
        self._settle(delivery_tag, multiple, requeue=requeue, counted=counted)

    async def basic_reject(
        self, delivery_tag: int, *, requeue: bool = True, wait: bool = True
    ) -> None:
        self._settle(delivery_tag, False, requeue=requeue)

    def _settle(
        self, delivery_tag: int, multiple: bool, *, requeue: bool | None, counted: bool = True
    ) -> None:
        """``requeue``: None acks, True returns to the queue, False dead-letters (rejected);
        ``counted``: whether a return counts toward a quorum delivery limit."""
        self._check_open()
        everything = multiple and delivery_tag == 0
        if not multiple and delivery_tag in self._timed_out:
            self._settle_late(delivery_tag, requeue)
            return
        if delivery_tag not in self._unacked and not everything:
            # RabbitMQ closes the channel on an unknown (or already settled) delivery tag,
            # also when it is the tag of a multiple ack.
            self.fail(
                amqp_errors.ChannelPreconditionFailed(
                    f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"
                )
            )
            return
        if multiple:
            limit = delivery_tag or max(self._unacked, default=0)
            tags = sorted(tag for tag in self._unacked if tag <= limit)
        else:
            tags = [delivery_tag]
        settled = []
        for tag in tags:
            entry = self._unacked.pop(tag)
            if entry.consumer is not None:
                entry.consumer.unacked -= 1
            settled.append((entry.queue, entry.envelope, requeue))
        self.broker.settle(settled, counted=counted)

    def time_out(self, consumer: Consumer, now: float) -> bool:
        """Cancel ``consumer`` if a delivery it holds is older than its timeout (4.3+).

        As RabbitMQ 4.3 does: ``basic.cancel`` to the client, its unacked deliveries back to
        the head of the queue, uncounted (``x-acquired-count`` only), the channel open. A late
        ack of such a delivery still removes the message while it waits in the queue."""
        timeout = consumer.timeout_ms
        held = [tag for tag, entry in self._unacked.items() if entry.consumer is consumer]
        if timeout is None or not any(now - self._unacked[t].at > timeout for t in held):
            return False
        self.consumers.pop(consumer.tag, None)
        self.broker.remove_consumer(consumer)
        entries = [self._unacked.pop(tag) for tag in held]
        self._timed_out.update(zip(held, entries, strict=True))
        consumer.unacked = 0
        self.broker.settle(
            [(entry.queue, entry.envelope, True) for entry in entries], counted=False
        )
        frame = spec.Basic.Cancel(consumer_tag=consumer.tag)
        for callback in list(self.on_consumer_cancel_callbacks):
            callback(frame)
        return True

    def _settle_late(self, delivery_tag: int, requeue: bool | None) -> None:
        entry = self._timed_out.pop(delivery_tag)
        if requeue is None and entry.envelope in entry.queue.ready:
            entry.queue.ready.remove(entry.envelope)


def _consumer_timeout(queue: MemoryQueue, arguments: dict[str, Any] | None) -> int | None:
    """The consumer_timeout (ms) the broker enforces on a consumer by ``basic.cancel``: the
    consumer's ``x-consumer-timeout`` argument, else the queue's (quorum queues, 4.3+)."""
    if queue.kind != "quorum" or not queue.version.cancels_timed_out_consumers:
        return None
    for value in (
        (arguments or {}).get("x-consumer-timeout"),
        queue.arguments.get("x-consumer-timeout"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _count_headers(
    properties: spec.Basic.Properties, envelope: Envelope, version: BrokerVersion, got: bool
) -> None:
    """The counts a quorum queue puts on a delivery: ``x-delivery-count`` (returns that count
    toward the limit) once there is one, and 0 on a first ``basic.get`` before 3.12 (not on a
    consumer's: measured on 3.10.8); from 4.3 ``x-acquired-count`` (every earlier delivery)
    once there is one."""
    headers = dict(properties.headers or {})
    if envelope.delivery_count or (got and version.counts_first_delivery):
        headers["x-delivery-count"] = envelope.delivery_count
    if envelope.acquired_count and version.counts_acquisitions:
        headers["x-acquired-count"] = envelope.acquired_count
    if headers:
        properties.headers = headers
