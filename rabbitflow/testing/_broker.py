"""An in-memory broker that behaves like RabbitMQ for everything rabbitflow relies on.

Exchanges (direct, topic, fanout, headers, exchange-to-exchange bindings, the default
exchange, alternate exchanges), queues with competing consumers and prefetch, ack / nack /
reject with requeue, per-queue and per-message TTL, dead-lettering with ``x-death``,
``x-max-length`` overflow, quorum ``x-delivery-limit``, mandatory returns, publisher
confirms and direct reply-to (``amq.rabbitmq.reply-to``). Time is a
:class:`~rabbitflow.testing.clock.VirtualClock`: TTLs expire when the test advances it.
``docs/testing.md`` lists what differs from RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiormq.exceptions as amqp_errors
from pamqp import commands as spec
from pamqp import decode, encode

from rabbitflow._broker_version import BrokerVersion
from rabbitflow._duration import parse_duration
from rabbitflow.testing._channel import MemoryChannel, MemoryConnection
from rabbitflow.testing._clock import VirtualClock
from rabbitflow.testing._deadletter import dead_lettered, is_cycle
from rabbitflow.testing._envelope import Envelope, StoredMessage, roundtrip
from rabbitflow.testing._queue import MODELLED_VERSION, Consumer, MemoryQueue
from rabbitflow.testing._routing import headers_match, topic_matches
from rabbitflow.topology._derived import Declarations
from rabbitflow.types import ExchangeType

QUEUE_TYPES = ("classic", "quorum", "stream")
# Exchanges every RabbitMQ vhost has.
PREDECLARED: dict[str, ExchangeType] = {
    "amq.direct": "direct",
    "amq.fanout": "fanout",
    "amq.topic": "topic",
    "amq.headers": "headers",
    "amq.match": "headers",
}

__all__ = [
    "Binding",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryConnection",
    "MemoryExchange",
    "MemoryQueue",
    "PublishResult",
    "StoredMessage",
]


@dataclass(frozen=True, slots=True)
class Binding:
    """A binding from exchange ``source`` to a queue or exchange ``destination``."""

    source: str
    destination: str
    destination_type: Literal["queue", "exchange"]
    routing_key: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class MemoryExchange:
    """An exchange and the bindings that leave it."""

    name: str
    type: ExchangeType
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: list[Binding] = field(default_factory=list)

    def matches(self, binding: Binding, routing_key: str, headers: Mapping[str, Any]) -> bool:
        if self.type == "fanout":
            return True
        if self.type == "topic":
            return topic_matches(binding.routing_key, routing_key)
        if self.type == "headers":
            return headers_match(binding.arguments, headers)
        return binding.routing_key == routing_key


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where a publish went: the queues that took it, and whether it was returned or refused."""

    queues: tuple[str, ...]
    returned: bool = False
    rejected: bool = False


class MemoryBroker:
    """One virtual host of an in-memory RabbitMQ.

    Declare objects with :meth:`declare` (a topology's ``derive()``) or the ``declare_*`` /
    ``bind_*`` methods, open aiormq-shaped channels with :meth:`connect`, and move time with
    :meth:`advance`. Deliveries run as tasks on the current event loop.

    ``version`` is the RabbitMQ release to behave like where releases differ (``"4.0"`` by
    default, ``"3.10"``, ``"4.3"``): where a quorum queue puts a requeued message (4.0+: the
    head, 3.x: the back), whether a first delivery carries ``x-delivery-count: 0`` (before
    3.12), 4.0's default quorum delivery limit of 20, and 4.3's counting: a
    ``basic.nack`` with requeue no longer counts toward the delivery limit (``basic.reject``
    and a closed channel do) and deliveries carry ``x-acquired-count``.
    """

    def __init__(
        self, clock: VirtualClock | None = None, *, version: str | BrokerVersion = MODELLED_VERSION
    ) -> None:
        parsed = BrokerVersion.parse(version) if isinstance(version, str) else version
        if parsed is None:
            raise ValueError(f"version {version!r} is not a RabbitMQ version such as '4.0'")
        self.version = parsed
        self.clock = clock or VirtualClock()
        self.exchanges: dict[str, MemoryExchange] = {
            name: MemoryExchange(name, kind) for name, kind in PREDECLARED.items()
        }
        self.queues: dict[str, MemoryQueue] = {}
        self.errors: list[BaseException] = []
        # Direct reply-to: each channel consuming from amq.rabbitmq.reply-to, by its address.
        self.reply_channels: dict[str, MemoryChannel] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pumping: set[str] = set()

    # -- declaring ---------------------------------------------------------------------------

    def declare(self, declarations: Declarations) -> None:
        """Declare everything ``rabbitflow.topology.derive()`` lists, in its order."""
        for exchange in declarations.exchanges:
            self.declare_exchange(
                exchange.name,
                exchange.type,  # type: ignore[arg-type]
                durable=exchange.durable,
                auto_delete=exchange.auto_delete,
                internal=exchange.internal,
                arguments=exchange.arguments,
            )
        for binding in declarations.exchange_bindings:
            self.bind_exchange(
                binding.destination, binding.source, binding.routing_key, binding.arguments
            )
        for queue in declarations.queues:
            self.declare_queue(
                queue.name,
                durable=queue.durable,
                exclusive=queue.exclusive,
                auto_delete=queue.auto_delete,
                arguments=queue.arguments,
            )
        for binding in declarations.queue_bindings:
            self.bind_queue(
                binding.destination, binding.source, binding.routing_key, binding.arguments
            )

    def declare_exchange(
        self,
        name: str,
        type: ExchangeType = "direct",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> MemoryExchange:
        """Declare an exchange; redeclaring with other properties fails as in RabbitMQ."""
        if type not in ("direct", "topic", "fanout", "headers"):
            raise amqp_errors.ConnectionCommandInvalid(
                f"COMMAND_INVALID - unknown exchange type '{type}'"
            )
        existing = self.exchanges.get(name)
        wanted = MemoryExchange(name, type, durable, auto_delete, internal, _table(arguments))
        if existing is None:
            self.exchanges[name] = wanted
            return wanted
        for prop in ("type", "durable", "auto_delete", "internal", "arguments"):
            if getattr(existing, prop) != getattr(wanted, prop):
                raise _inequivalent(prop, "exchange", name)
        return existing

    def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> MemoryQueue:
        """Declare a queue; checks what RabbitMQ checks for quorum queues and redeclarations."""
        args = _table(arguments)
        wanted = MemoryQueue(name, durable, exclusive, auto_delete, args, version=self.version)
        _check_queue(wanted)
        existing = self.queues.get(name)
        if existing is None:
            self.queues[name] = wanted
            return wanted
        for prop in ("durable", "exclusive", "auto_delete"):
            if getattr(existing, prop) != getattr(wanted, prop):
                raise _inequivalent(prop, "queue", name)
        for key in sorted(set(existing.arguments) | set(args)):
            if existing.arguments.get(key) != args.get(key):
                raise _inequivalent(key, "queue", name)
        return existing

    def bind_queue(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Bind ``queue`` to ``exchange``."""
        self._queue_or_error(queue)
        self._bind(Binding(exchange, queue, "queue", routing_key, _table(arguments)))

    def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Bind exchange ``destination`` to ``source``: messages flow from source to destination."""
        self._exchange_or_error(destination)
        self._bind(Binding(source, destination, "exchange", routing_key, _table(arguments)))

    def _bind(self, binding: Binding) -> None:
        if binding.source == "":
            raise amqp_errors.ChannelAccessRefused(
                "ACCESS_REFUSED - operation not permitted on the default exchange"
            )
        source = self._exchange_or_error(binding.source)
        if binding not in source.bindings:
            source.bindings.append(binding)

    def delete_queue(self, name: str) -> int:
        """Delete a queue, its bindings and consumers (who are told, as by RabbitMQ); return
        how many messages it held."""
        queue = self.queues.pop(name, None)
        if queue is None:
            return 0
        for exchange in self.exchanges.values():
            exchange.bindings = [
                b
                for b in exchange.bindings
                if not (b.destination_type == "queue" and b.destination == name)
            ]
        for consumer in list(queue.consumers):
            consumer.channel.consumers.pop(consumer.tag, None)
            for callback in list(consumer.channel.on_consumer_cancel_callbacks):
                callback(spec.Basic.Cancel(consumer_tag=consumer.tag))
        queue.consumers.clear()
        return len(queue.ready)

    def purge(self, name: str) -> int:
        """Drop the ready messages of a queue; return how many there were."""
        queue = self.queue(name)
        count = len(queue.ready)
        queue.ready.clear()
        queue.blocked = False
        return count

    # -- reading -----------------------------------------------------------------------------

    def queue(self, name: str) -> MemoryQueue:
        """The queue ``name`` (``KeyError`` listing the declared queues when there is none)."""
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues)) or "none"
            raise KeyError(
                f"no queue {name!r} in the in-memory broker (declared: {known})"
            ) from None

    def _queue_or_error(self, name: str) -> MemoryQueue:
        queue = self.queues.get(name)
        if queue is None:
            raise amqp_errors.ChannelNotFoundEntity(f"NOT_FOUND - no queue '{name}' in vhost '/'")
        return queue

    def _exchange_or_error(self, name: str) -> MemoryExchange:
        exchange = self.exchanges.get(name)
        if exchange is None:
            raise amqp_errors.ChannelNotFoundEntity(
                f"NOT_FOUND - no exchange '{name}' in vhost '/'"
            )
        return exchange

    # -- connections -------------------------------------------------------------------------

    def connect(self) -> MemoryConnection:
        """A connection whose ``channel()`` opens aiormq-shaped :class:`MemoryChannel` objects."""
        return MemoryConnection(self)

    # -- publishing and routing --------------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties | None = None,
        *,
        mandatory: bool = False,
    ) -> PublishResult:
        """Route one message to every queue its exchange (and those bound to it) selects."""
        stored = roundtrip(properties or spec.Basic.Properties(delivery_mode=1))
        envelope = Envelope(body, stored, exchange, [routing_key])
        targets = self.route(exchange, [routing_key], stored.headers or {})
        accepted = [self._enqueue(queue, envelope.copy()) for queue in targets]
        return PublishResult(
            tuple(queue.name for queue in targets),
            returned=mandatory and not targets,
            rejected=not all(accepted),
        )

    def route(
        self, exchange: str, routing_keys: Iterable[str], headers: Mapping[str, Any]
    ) -> list[MemoryQueue]:
        """The queues a message published to ``exchange`` reaches, each once."""
        keys = list(routing_keys)
        if exchange == "":
            # The default exchange: every queue is bound under its own name.
            return list({key: self.queues[key] for key in keys if key in self.queues}.values())
        source = self.exchanges.get(exchange)
        found: dict[str, MemoryQueue] = {}
        if source is None:
            return []
        self._walk(source, keys, headers, found, set())
        alternate = source.arguments.get("alternate-exchange")
        if not found and isinstance(alternate, str) and alternate in self.exchanges:
            self._walk(self.exchanges[alternate], keys, headers, found, {source.name})
        return list(found.values())

    def _walk(
        self,
        exchange: MemoryExchange,
        keys: list[str],
        headers: Mapping[str, Any],
        found: dict[str, MemoryQueue],
        visited: set[str],
    ) -> None:
        if exchange.name in visited:
            return
        visited.add(exchange.name)
        for binding in exchange.bindings:
            if not any(exchange.matches(binding, key, headers) for key in keys):
                continue
            if binding.destination_type == "queue":
                queue = self.queues.get(binding.destination)
                if queue is not None:
                    found.setdefault(queue.name, queue)
            elif binding.destination in self.exchanges:
                self._walk(self.exchanges[binding.destination], keys, headers, found, visited)

    def _enqueue(self, queue: MemoryQueue, envelope: Envelope) -> bool:
        if queue.refuses(envelope):
            if queue.overflow == "reject-publish-dlx":
                self._dead_letter(queue, envelope, "maxlen")
            return False
        for dropped in queue.put(envelope, self.clock.now_ms()):
            self._dead_letter(queue, dropped, "maxlen")
        self.pump(queue)
        return True

    def _dead_letter(self, queue: MemoryQueue, envelope: Envelope, reason: str) -> None:
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if not isinstance(exchange, str) or (exchange and exchange not in self.exchanges):
            return  # no dead-letter exchange (or a missing one): RabbitMQ drops the message
        routing_key = queue.arguments.get("x-dead-letter-routing-key")
        copy = dead_lettered(
            envelope,
            queue.name,
            reason,
            exchange,
            routing_key if isinstance(routing_key, str) else None,
            self.clock.time(),
        )
        headers = copy.properties.headers or {}
        deaths = headers.get("x-death")
        history = [d for d in deaths if isinstance(d, dict)] if isinstance(deaths, list) else []
        for target in self.route(exchange, copy.routing_keys, headers):
            if reason != "rejected" and is_cycle(target.name, history):
                continue
            self._enqueue(target, copy.copy())

    # -- delivering --------------------------------------------------------------------------

    def add_consumer(self, queue: MemoryQueue, consumer: Consumer) -> None:
        queue.consumers.append(consumer)
        self.pump(queue)

    def remove_consumer(self, consumer: Consumer) -> None:
        queue = self.queues.get(consumer.queue)
        if queue is None or consumer not in queue.consumers:
            return
        queue.consumers.remove(consumer)
        if queue.auto_delete and not queue.consumers:
            self.delete_queue(queue.name)

    def pump(self, queue: MemoryQueue) -> None:
        """Expire the head while it is past its TTL, and push messages to consumers with room."""
        if queue.name in self._pumping:
            return
        self._pumping.add(queue.name)
        try:
            now = self.clock.now_ms()
            while queue.ready:
                deliverable = any(consumer.has_capacity() for consumer in queue.consumers)
                if queue.expired_head(now, deliverable=deliverable):
                    self._dead_letter(queue, queue.take(), "expired")
                    continue
                consumer = queue.next_consumer()
                if consumer is None:
                    return
                consumer.channel.deliver(consumer, queue, queue.take())
        finally:
            self._pumping.discard(queue.name)

    def pump_all(self) -> None:
        for queue in list(self.queues.values()):
            self.pump(queue)

    def take(self, queue: MemoryQueue) -> Envelope | None:
        """The head for ``basic.get``, after expiring what is past its TTL."""
        now = self.clock.now_ms()
        while queue.expired_head(now, deliverable=False):
            self._dead_letter(queue, queue.take(), "expired")
        return queue.take() if queue.ready else None

    def settle(
        self,
        entries: Iterable[tuple[MemoryQueue, Envelope, bool | None]],
        *,
        returned: bool = False,
        counted: bool = True,
    ) -> None:
        """Acks (None), requeues (True) and rejections (False) of unacked deliveries;
        ``returned``: given back by a closed channel rather than a nack or reject;
        ``counted``: whether a requeue counts toward a quorum delivery limit (not a nack on
        4.3+)."""
        for queue, envelope, requeue in entries:
            queue.unacked -= 1
            if requeue is None:
                continue
            if not requeue:
                self._dead_letter(queue, envelope, "rejected")
            elif not queue.requeue(envelope, returned=returned, counted=counted):
                self._dead_letter(queue, envelope, "delivery_limit")
        self.pump_all()

    def run(self, call: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a consumer callback as a task, as aiormq does, and keep track of it."""
        task = asyncio.get_running_loop().create_task(_awaited(call))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())  # type: ignore[arg-type]

    def pending(self) -> set[asyncio.Task[Any]]:
        """Consumer callbacks still running."""
        return {task for task in self._tasks if not task.done()}

    # -- time --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The virtual time (ms) at which the next message expires, if any will."""
        deadlines = [d for queue in self.queues.values() if (d := queue.deadline()) is not None]
        return min(deadlines, default=None)

    def advance_to(self, ms: float) -> None:
        """Set the clock to ``ms``, expire what is due and cancel consumers past their
        ``consumer_timeout`` (4.3+; one step, see :meth:`advance`)."""
        self.clock.advance_to(ms)
        self._time_out_consumers(ms)
        self.pump_all()

    def _time_out_consumers(self, now: float) -> None:
        for queue in list(self.queues.values()):
            for consumer in list(queue.consumers):
                if consumer.timeout_ms is not None:
                    consumer.channel.time_out(consumer, now)

    def advance(self, delay: str | int) -> None:
        """Let ``delay`` pass, expiring messages in deadline order (``"5s"`` or ms).

        Consumers get deliveries as tasks: to let handlers run between expiries, use
        :meth:`TestApp.advance <rabbitflow.testing.TestApp.advance>`."""
        target = self.clock.now_ms() + parse_duration(delay)
        while (deadline := self.next_deadline()) is not None and deadline <= target:
            self.advance_to(deadline)
        self.advance_to(target)

    async def close(self) -> None:
        """Cancel the consumer callbacks still running."""
        for task in self.pending():
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


async def _awaited(call: Awaitable[Any]) -> Any:
    return await call


def _table(arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    """Arguments as RabbitMQ sees them: through the AMQP field-table encoding."""
    if not arguments:
        return {}
    return decode.field_table(encode.field_table(dict(arguments)))[1]


def _inequivalent(prop: str, kind: str, name: str) -> amqp_errors.ChannelPreconditionFailed:
    return amqp_errors.ChannelPreconditionFailed(
        f"PRECONDITION_FAILED - inequivalent arg '{prop}' for {kind} '{name}' in vhost '/'"
    )


def _check_queue(queue: MemoryQueue) -> None:
    if queue.kind not in QUEUE_TYPES:
        raise amqp_errors.ChannelPreconditionFailed(
            f"PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{queue.name}'"
        )
    if queue.kind == "classic":
        return
    for prop, bad in (
        ("non-durable", not queue.durable),
        ("exclusive", queue.exclusive),
        ("auto-delete", queue.auto_delete),
    ):
        if bad:
            raise amqp_errors.ChannelPreconditionFailed(
                f"PRECONDITION_FAILED - invalid property '{prop}' for queue '{queue.name}'"
            )
    if queue.overflow == "reject-publish-dlx":
        raise amqp_errors.ChannelPreconditionFailed(
            f"PRECONDITION_FAILED - invalid arg 'x-overflow' for queue '{queue.name}'"
        )
