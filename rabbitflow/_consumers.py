"""The consumers of an app: wired once, then started on whatever connection they are given.

:meth:`ConsumerSet.build` does what needs no broker: handler signatures, outcome policies,
the executor of sync handlers, the dispatcher of each consumer. :meth:`ConsumerSet.start`
opens one channel per consumer on a connection (the worker's, or the test kit's in-memory
one) and returns a :class:`RunningConsumer` for each, which lives as long as that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import aiormq
import structlog

from rabbitflow._breaker import CircuitBreaker
from rabbitflow._broker_version import BrokerVersion, Returns
from rabbitflow._dispatch import Dispatcher, DispatchSpec
from rabbitflow._handler import Consumer, Signature, inspect_handler
from rabbitflow._importer import exception_types
from rabbitflow._metrics import Metrics
from rabbitflow._outcome import OutcomePolicy
from rabbitflow._publisher import Publisher
from rabbitflow._repair import Repairer
from rabbitflow._rpc import Replier
from rabbitflow._settle import Acker, Settler
from rabbitflow._streams import StreamOffsets
from rabbitflow._streams.offsets import Callback
from rabbitflow._telemetry import Telemetry
from rabbitflow._tracing import get_tracing
from rabbitflow.app import App
from rabbitflow.errors import BrokerError
from rabbitflow.topology import Declarations, Topology, derive

log = structlog.get_logger("rabbitflow.worker")

# The test kit's hooks: one replaces a handler (to record its calls), one wraps the
# delivery callback (to know the delivery a handler runs for).
Instrument = Callable[[Consumer, Signature], Consumer]
Wrap = Callable[[Callback], Callback]

# RabbitMQ's default consumer_timeout: a delivery unacked for longer closes its channel.
BROKER_CONSUMER_TIMEOUT_MS = 30 * 60 * 1000


class RunningConsumer:
    """One consumer on its own channel, for as long as that channel's connection lasts."""

    __slots__ = (
        "_callback",
        "_prefix",
        "acker",
        "breaker",
        "cancelled",
        "channel",
        "offsets",
        "paused",
        "queue",
        "tag",
    )

    def __init__(
        self,
        queue: str,
        channel: aiormq.abc.AbstractChannel,
        acker: Acker,
        breaker: CircuitBreaker | None,
        prefix: str,
    ) -> None:
        self.queue = queue
        self.channel = channel
        self.acker = acker
        self.breaker = breaker
        self.offsets: StreamOffsets | None = None
        self.tag: str | None = None  # None: not consuming (not started yet, or paused)
        self.paused = False
        self._prefix = prefix
        self._callback: Callback | None = None
        # Set when the broker cancels the consumer (its queue was deleted): the worker treats
        # it like a lost connection and declares (or verifies) the topology again.
        self.cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        channel.on_consumer_cancel_callbacks.add(self._on_cancel)

    def _on_cancel(self, _frame: Any) -> None:
        if not self.cancelled.done():
            self.cancelled.set_exception(
                BrokerError(f"the broker cancelled the consumer of queue {self.queue!r} (deleted?)")
            )
            self.cancelled.exception()  # retrieved: nobody has to wait for it

    def _new_tag(self) -> str:
        return f"{self._prefix}.{uuid.uuid4().hex[:8]}"

    async def consume(self, callback: Callback) -> None:
        """basic.consume; a stream consumer resumes after the last handled offset."""
        self._callback = callback
        arguments = None
        if self.offsets is not None:
            callback, arguments = self.offsets.wrap(callback), self.offsets.consume_arguments()
        tag = self._new_tag()
        await self.channel.basic_consume(
            self.queue, callback, consumer_tag=tag, arguments=arguments
        )
        self.tag = tag

    async def pause(self) -> None:
        """basic.cancel: the broker stops delivering; the backlog stays in the queue."""
        self.paused = True
        tag, self.tag = self.tag, None
        if tag is not None:
            with contextlib.suppress(Exception):
                await self.channel.basic_cancel(tag)

    async def resume(self) -> None:
        """Consume again after :meth:`pause`."""
        self.paused = False
        if self.tag is not None or self._callback is None:
            return
        # A fresh consumer tag: RabbitMQ before 3.10.9 / 3.11.1 crashes the channel
        # (INTERNAL_ERROR) when a quorum-queue consumer comes back under the tag it
        # just cancelled while deliveries of that tag are in flight (rabbitmq-server#5927).
        tag = self.tag = self._new_tag()
        with contextlib.suppress(Exception):
            await self.channel.basic_consume(self.queue, self._callback, consumer_tag=tag)

    async def cancel(self) -> None:
        """basic.cancel for a drain: no new deliveries; those in hand stay ours to settle."""
        if self.tag is not None:
            await self.channel.basic_cancel(self.tag)

    async def save_offset(self) -> None:
        """A stream consumer stores the last handled offset."""
        if self.offsets is not None:
            await self.offsets.close()

    async def flush(self) -> None:
        """Send the acks of the deliveries completed so far."""
        await self.acker.flush()

    async def drain(self) -> None:
        """Send every pending ack (handlers are done), then stop acking."""
        await self.acker.close()

    def drop(self) -> None:
        """The channel is lost: its delivery tags mean nothing any more, nothing is sent."""
        self.acker.abort()
        self.close()

    def close(self) -> None:
        """Stop what runs on a timer: the breaker's cool-down, the offset saver."""
        if self.breaker is not None:
            self.breaker.cancel()
        if self.offsets is not None:
            self.offsets.stop()


class ConsumerSet:
    """Every consumer of an app with its wiring, started anew on each connection."""

    def __init__(
        self,
        app: App,
        topology: Topology,
        declarations: Declarations,
        signatures: dict[str, Signature],
        policies: dict[str, OutcomePolicy],
        *,
        metrics: Metrics,
        executor: Executor,
        repairer: Repairer | None,
        breakers: bool,
        streams: bool,
        instrument: Instrument | None,
        wrap: Wrap | None,
    ) -> None:
        self.app = app
        self.topology = topology
        self.declarations = declarations
        self.signatures = signatures
        self.policies = policies
        self.metrics = metrics
        self.tracing = get_tracing()
        self.repairer = repairer
        self.in_flight: set[asyncio.Task[Any]] = set()
        self._executor = executor
        self._breakers = breakers
        self._streams = streams
        self._wrap = wrap
        self.consumers = {
            queue: instrument(consumer, signatures[queue]) if instrument else consumer
            for queue, consumer in app.consumers.items()
        }

    @classmethod
    def build(
        cls,
        app: App,
        topology: Topology,
        *,
        metrics: Metrics | None = None,
        executor: Executor | None = None,
        repairer: Repairer | None = None,
        breakers: bool = True,
        streams: bool = True,
        instrument: Instrument | None = None,
        wrap: Wrap | None = None,
    ) -> ConsumerSet:
        """Wire ``app``'s consumers against ``topology``; nothing here talks to a broker.

        ``breakers`` and ``streams`` turn circuit breakers and stream offset tracking off
        (the test kit, whose virtual time has neither)."""
        signatures = {queue: inspect_handler(consumer) for queue, consumer in app.consumers.items()}
        declarations = derive(topology)
        policies = {
            queue: OutcomePolicy(
                topology.queues[queue].retry,
                declarations.routes[queue],
                consumer.retry_on
                + exception_types(topology.queues[queue].retry_on, f"queues.{queue}.retry_on"),
                consumer.dead_letter_on
                + exception_types(
                    topology.queues[queue].dead_letter_on, f"queues.{queue}.dead_letter_on"
                ),
                consumer_timeout_ms=topology.queues[queue].consumer_timeout_ms,
            )
            for queue, consumer in app.consumers.items()
        }
        _warn_timeouts(app, topology)
        if executor is None:
            executor = ThreadPoolExecutor(
                max_workers=_thread_count(topology, signatures),
                thread_name_prefix="rabbitflow-handler",
            )
        return cls(
            app,
            topology,
            declarations,
            signatures,
            policies,
            metrics=metrics or Metrics(app.metrics_registry),
            executor=executor,
            repairer=repairer,
            breakers=breakers,
            streams=streams,
            instrument=instrument,
            wrap=wrap,
        )

    def dispatcher(
        self,
        consumer: Consumer,
        channel: aiormq.abc.AbstractChannel,
        publisher: Publisher,
        *,
        breaker: CircuitBreaker | None = None,
        executor: Executor | None = None,
        in_flight: set[asyncio.Task[Any]] | None = None,
        version: BrokerVersion | None = None,
    ) -> tuple[Dispatcher, Acker]:
        """The dispatcher (and its acker) of ``consumer`` on ``channel``.

        ``executor`` and ``in_flight`` default to the set's own; ``version`` is the broker's,
        which decides what returning a delivery costs it (see :class:`Returns`)."""
        config = self.topology.queues[consumer.queue]
        returns = Returns.of(config.queue_type, version)
        acker = Acker(channel, config.prefetch, returns=returns)
        settler = Settler(
            self.policies[consumer.queue], acker, publisher, self.metrics, self.repairer
        )
        spec = DispatchSpec(
            consumer,
            self.signatures[consumer.queue],
            self.policies[consumer.queue],
            timeout_ms=config.timeout_ms,
            max_body_size=config.max_body_size,
            max_in_flight=config.max_in_flight,
            prefetch=config.prefetch,
            immediate_retries=config.immediate_retries,
            middleware=self.app.middleware,
            guard=self.app.guard(consumer.queue, self.topology),
        )
        dispatcher = Dispatcher(
            spec,
            settler,
            Telemetry.bind(self.metrics, consumer.queue, self.tracing),
            executor=executor or self._executor,
            in_flight=self.in_flight if in_flight is None else in_flight,
            breaker=breaker,
            replier=Replier(consumer.queue, publisher),
        )
        return dispatcher, acker

    async def start(
        self, connection: aiormq.abc.AbstractConnection, publisher: Publisher
    ) -> list[RunningConsumer]:
        """Start every consumer on a channel of its own on ``connection``: all, or none."""
        running: list[RunningConsumer] = []
        try:
            for consumer in self.consumers.values():
                running.append(await self._start(connection, consumer, publisher))
        except BaseException:
            for started in running:
                started.drop()
            raise
        return running

    async def _start(
        self, connection: aiormq.abc.AbstractConnection, consumer: Consumer, publisher: Publisher
    ) -> RunningConsumer:
        config = self.topology.queues[consumer.queue]
        channel = await connection.channel(publisher_confirms=False)
        # basic.qos caps the deliveries the broker pushes before they are acked.
        await channel.basic_qos(prefetch_count=config.prefetch)
        breaker = self._breaker(consumer.queue, lambda: running.pause(), lambda: running.resume())
        dispatcher, acker = self.dispatcher(
            consumer,
            channel,
            publisher,
            breaker=breaker,
            version=BrokerVersion.from_properties(connection.server_properties),
        )
        running = RunningConsumer(
            consumer.queue, channel, acker, breaker, f"{self.app.name}.{consumer.queue}"
        )
        callback: Callback = self._wrap(dispatcher) if self._wrap is not None else dispatcher
        try:
            if self._streams and config.queue_type == "stream":
                running.offsets = await StreamOffsets.open(
                    connection, config, self.app.name, publisher
                )
            await running.consume(callback)
        except BaseException:
            running.drop()
            raise
        return running

    def _breaker(
        self,
        queue: str,
        pause: Callable[[], Awaitable[None]],
        resume: Callable[[], Awaitable[None]],
    ) -> CircuitBreaker | None:
        config = self.topology.queues[queue].circuit_breaker
        if config is None or not self._breakers:
            return None
        return CircuitBreaker(queue, config, pause, resume, self.metrics.breaker.labels(queue))

    def cancel_handlers(self) -> None:
        """Cancel the handlers still running (their deliveries are requeued by the broker)."""
        for task in list(self.in_flight):
            task.cancel()

    def close(self) -> None:
        """Stop the threads of sync handlers."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _thread_count(topology: Topology, signatures: dict[str, Signature]) -> int:
    sync = [topology.queues[q].max_in_flight for q, sig in signatures.items() if not sig.is_async]
    return max(1, min(sum(sync), 256))


def _warn_timeouts(app: App, topology: Topology) -> None:
    # A queue's own consumer_timeout is checked against its handler timeout by validate;
    # the broker-wide default is not known before connecting, so it is assumed here.
    for queue in app.consumers:
        config = topology.queues[queue]
        timeout = config.timeout_ms
        if config.consumer_timeout_ms is not None:
            continue
        if timeout is not None and timeout >= BROKER_CONSUMER_TIMEOUT_MS:
            log.warning(
                "handler timeout is not below RabbitMQ's consumer_timeout (30m by default): "
                "a handler running that long gets its channel closed by the broker",
                queue=queue,
                timeout_ms=timeout,
            )
