"""The consumers of an app: wired once, then started on whatever connection they are given.

:meth:`ConsumerSet.build` does what needs no broker: handler signatures, outcome policies,
the executor of sync handlers, the dispatcher of each consumer. :meth:`ConsumerSet.start`
opens one channel per consumer on a connection (the worker's, or the test kit's in-memory
one) and returns a :class:`RunningConsumer` for each, which lives as long as that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import aiormq

from rabbitflow._backoff import full_jitter
from rabbitflow._breaker import CircuitBreaker, Dependencies, Dependency
from rabbitflow._broker_version import BrokerVersion, Returns
from rabbitflow._continuation import Continuer
from rabbitflow._dispatch import Dispatcher, DispatchSpec
from rabbitflow._duration import format_duration
from rabbitflow._handler import Consumer, Signature, inspect_handler
from rabbitflow._importer import exception_types
from rabbitflow._logging import get_logger
from rabbitflow._metrics import Metrics
from rabbitflow._outcome import OutcomePolicy
from rabbitflow._publisher import Publisher
from rabbitflow._repair import Repairer
from rabbitflow._rpc import Replier
from rabbitflow._settle import Acker, Losses, Settler
from rabbitflow._streams import StreamOffsets
from rabbitflow._streams.offsets import Callback
from rabbitflow._telemetry import Telemetry
from rabbitflow._tracing import get_tracing
from rabbitflow.app import App
from rabbitflow.errors import BrokerError
from rabbitflow.idempotency._guard import Guard
from rabbitflow.topology import Declarations, QueueConfig, Topology, derive
from rabbitflow.topology._derived import MIGRATING_SUFFIX

log = get_logger("rabbitflow.worker")

# The test kit's hooks: one replaces a handler (to record its calls), one wraps the
# delivery callback (to know the delivery a handler runs for).
Instrument = Callable[[Consumer, Signature], Consumer]
Wrap = Callable[[Callback], Callback]

# RabbitMQ's default consumer_timeout: a delivery unacked for longer closes its channel.
BROKER_CONSUMER_TIMEOUT_MS = 30 * 60 * 1000
# Broker cancels within this window count towards the back-off before consuming again.
CANCEL_WINDOW = 60.0
# How long a consumer whose queue is being re-created by `topology migrate` waits for it.
MIGRATION_WAIT = 60.0
CANCEL_REASON = "the queue was deleted or became unavailable (a leader or stream member moved)"
TIMEOUT_REASON = (
    "a delivery stayed unacknowledged past the consumer timeout ({limit}; RabbitMQ returns it "
    "to the queue, where it is delivered again), or the queue was deleted or its leader moved"
)


class RunningConsumer:
    """One consumer on its own channel, for as long as that channel's connection lasts."""

    __slots__ = (
        "_arguments",
        "_callback",
        "_cancels",
        "_deliver",
        "_prefix",
        "_reason",
        "_resubscriber",
        "_stopped",
        "acker",
        "breaker",
        "cancelled",
        "channel",
        "dependencies",
        "holds",
        "offsets",
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
        *,
        arguments: dict[str, Any] | None = None,
        cancel_reason: str = CANCEL_REASON,
    ) -> None:
        self.queue = queue
        self.channel = channel
        self.acker = acker
        self.breaker = breaker
        self.offsets: StreamOffsets | None = None
        self.tag: str | None = None  # None: not consuming (not started yet, or paused)
        # Why it is paused: its breaker, a store it needs. It consumes when none is left.
        self.holds: set[str] = set()
        self.dependencies: list[Dependency] = []
        self._prefix = prefix
        self._callback: Callback | None = None
        self._deliver: Callback | None = None  # the callback as consumed (offsets tracked)
        self._arguments = arguments  # basic.consume's own (a 4.3 consumer timeout)
        self._reason = cancel_reason
        self._stopped = False
        self._cancels: list[float] = []  # when the broker cancelled this consumer lately
        self._resubscriber: asyncio.Task[None] | None = None
        # Set when consuming again after a broker-sent basic.cancel finds the queue gone: the
        # worker treats it like a lost connection and declares (or verifies) the topology again.
        self.cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        channel.on_consumer_cancel_callbacks.add(self._on_cancel)

    def _on_cancel(self, frame: Any) -> None:
        # The broker cancelled our consumer: its queue was deleted, its stream member or
        # leader went away, or (RabbitMQ 4.3+, quorum queues) a delivery stayed unacked past
        # the consumer timeout, which returns that delivery to the queue. Deliveries in hand
        # stay ours to settle on this channel; only new ones stop.
        tag = getattr(frame, "consumer_tag", None)
        if tag is None or tag != self.tag or self._stopped:
            return
        self.tag = None
        now = time.monotonic()
        self._cancels = [t for t in self._cancels if now - t < CANCEL_WINDOW] + [now]
        self._resubscriber = asyncio.get_running_loop().create_task(self._resubscribe(tag))

    async def _resubscribe(self, old: str) -> None:
        # RabbitMQ 4.3 keeps a timed-out quorum consumer registered until the client settles
        # what timed out (4.3.7+: until it answers basic.cancel-ok), then delivers to its old
        # tag again, which the client no longer routes: those deliveries would sit unacked
        # until the channel closes. Cancelling the old tag ourselves ends it on every
        # version (a tag the broker already forgot is answered with cancel-ok).
        with contextlib.suppress(Exception):
            await self.channel.basic_cancel(old)
        if await self._queue_gone():
            log.warning("the broker cancelled the consumer: its queue is gone", queue=self.queue)
            self._fail(f"the broker cancelled the consumer of queue {self.queue!r} (deleted)")
            return
        count = len(self._cancels)
        wait = 0.0 if count == 1 else full_jitter(count - 1, base=1.0, cap=30.0)
        log.warning(
            "the broker cancelled the consumer; consuming again",
            queue=self.queue,
            consumer_tag=old,
            reason=self._reason,
            retry_in=round(wait, 2),
        )
        if wait:
            await asyncio.sleep(wait)
        if self.paused or self._stopped or self.tag is not None or self._deliver is None:
            return  # the breaker's or the store's resume, or nobody, consumes again
        try:
            await self._subscribe()
        except Exception as exc:  # the channel closed: the worker sees it and reconnects
            self._fail(f"could not consume {self.queue!r} again after a broker cancel: {exc!r}")

    async def _queue_gone(self) -> bool:
        """Whether the queue is missing, by a passive declare on a channel of its own (a 404
        closes the channel it is asked on)."""
        try:
            channel = await self.channel.connection.channel()
        except Exception:
            return False
        try:
            await channel.queue_declare(self.queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return not await self._migrated_back()
        except Exception:  # refused (no permission on 4.3+) or the connection went: not known
            return False
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        return False

    async def _migrated_back(self) -> bool:
        """Whether the queue, gone because ``rabbitflow topology migrate`` re-creates it
        (its temporary queue ``<queue>.migrating`` exists), is back within a minute: then
        this consumer follows it without declaring anything. What reached the temporary
        queue meanwhile is moved back to the queue and consumed after."""
        deadline = time.monotonic() + MIGRATION_WAIT
        temporary = self.queue + MIGRATING_SUFFIX
        while time.monotonic() < deadline:
            found = {name: await self._exists(name) for name in (self.queue, temporary)}
            if found[self.queue]:
                log.info("the queue is back after a migration; consuming again", queue=self.queue)
                return True
            if not found[temporary]:
                return False
            await asyncio.sleep(0.1)
        return False

    async def _exists(self, queue: str) -> bool:
        try:
            channel = await self.channel.connection.channel()
        except Exception:
            return False
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        except Exception:  # refused, or the connection went: not known
            return False
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        return True

    def _fail(self, reason: str) -> None:
        if not self.cancelled.done():
            self.cancelled.set_exception(BrokerError(reason))
            self.cancelled.exception()  # retrieved: nobody has to wait for it

    @property
    def paused(self) -> bool:
        return bool(self.holds)

    def depend_on(self, dependency: Dependency) -> None:
        """Pause while ``dependency`` does not answer; start paused if it does not now."""
        reason = f"store {dependency.name}"
        if not dependency.up:
            self.holds.add(reason)
        dependency.attach(self, lambda: self.pause(reason), lambda: self.resume(reason))
        self.dependencies.append(dependency)

    def _new_tag(self) -> str:
        return f"{self._prefix}.{uuid.uuid4().hex[:8]}"

    async def consume(self, callback: Callback) -> None:
        """basic.consume; a stream consumer resumes after the last handled offset. A
        consumer held already (a store it needs is down) starts when the hold is lifted."""
        self._callback = callback
        self._deliver = callback if self.offsets is None else self.offsets.wrap(callback)
        if self.holds:
            return
        await self._subscribe()

    async def _subscribe(self) -> None:
        """basic.consume under a fresh tag, with the consumer's arguments and, for a stream,
        the offset after the last one stored (nothing handled since a pause is skipped)."""
        assert self._deliver is not None
        arguments = self._arguments
        if self.offsets is not None:
            arguments = {**(arguments or {}), **self.offsets.consume_arguments()}
        # A fresh consumer tag every time: RabbitMQ before 3.10.9 / 3.11.1 crashes the channel
        # (INTERNAL_ERROR) when a quorum-queue consumer comes back under the tag it
        # just cancelled while deliveries of that tag are in flight (rabbitmq-server#5927).
        tag = self.tag = self._new_tag()
        try:
            await self.channel.basic_consume(
                self.queue, self._deliver, consumer_tag=tag, arguments=arguments
            )
        except BaseException:
            self.tag = None
            raise

    async def pause(self, reason: str = "breaker") -> None:
        """basic.cancel: the broker stops delivering; the backlog stays in the queue."""
        self.holds.add(reason)
        tag, self.tag = self.tag, None
        if tag is not None:
            with contextlib.suppress(Exception):
                await self.channel.basic_cancel(tag)

    async def resume(self, reason: str = "breaker") -> None:
        """Consume again after :meth:`pause`, unless something else still holds it."""
        self.holds.discard(reason)
        if self.holds or self.tag is not None or self._deliver is None:
            return
        with contextlib.suppress(Exception):
            await self._subscribe()

    async def cancel(self) -> None:
        """basic.cancel for a drain: no new deliveries; those in hand stay ours to settle."""
        self._stop_resubscribing()
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
        self._stop_resubscribing()
        if self.breaker is not None:
            self.breaker.cancel()
        for dependency in self.dependencies:
            dependency.detach(self)
        if self.offsets is not None:
            self.offsets.stop()

    def _stop_resubscribing(self) -> None:
        self._stopped = True
        if self._resubscriber is not None:
            self._resubscriber.cancel()


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
        # Per queue, across connections: the messages in hand when connections were lost.
        self.losses = {queue: Losses() for queue in app.consumers}
        self._executor = executor
        self._breakers = breakers
        self._streams = streams
        self._wrap = wrap
        self.consumers = {
            queue: instrument(consumer, signatures[queue]) if instrument else consumer
            for queue, consumer in app.consumers.items()
        }
        # The idempotency guard of each queue (None: not idempotent), shared by every
        # channel the consumer runs on, and the stores they need: an outage of one pauses
        # the consumers that need it (off with ``breakers``).
        self.guards = {queue: app.guard(queue, topology) for queue in self.consumers}
        # The job recorder of each tracked queue (None: not tracked), shared likewise.
        self.trackers = {queue: app.tracker(queue, topology) for queue in self.consumers}
        self.dependencies = self._dependencies() if breakers else Dependencies()

    def _dependencies(self) -> Dependencies:
        found = Dependencies()
        guards = [guard for guard in self.guards.values() if guard is not None]
        for guard in guards:
            sharing = [other for other in guards if other.store is guard.store]
            found.add(guard.queue, guard.store, functools.partial(self._dependency, sharing))
        return found

    def _dependency(self, guards: list[Guard]) -> Dependency:
        name = repr(guards[0].store)

        async def probe() -> None:
            # Each guard of the store pings it and makes good the calls it was owed.
            for guard in guards:
                await guard.probe()

        return Dependency(
            name,
            probe,
            tuple(guard.queue for guard in guards),
            gauge=self.metrics.store_up.labels(name),
            outages=self.metrics.store_outages.labels(name),
        )

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

        ``breakers`` and ``streams`` turn circuit breakers (and the pauses for stores that
        do not answer) and stream offset tracking off (the test kit, whose virtual time has
        neither)."""
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
                crash_limit=topology.queues[queue].crash_limit,
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
            self.policies[consumer.queue],
            acker,
            publisher,
            self.metrics,
            self.repairer,
            self.losses[consumer.queue],
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
            guard=self.guards[consumer.queue],
            tracker=self.trackers[consumer.queue],
        )
        dispatcher = Dispatcher(
            spec,
            settler,
            Telemetry.bind(self.metrics, consumer.queue, self.tracing),
            executor=executor or self._executor,
            in_flight=self.in_flight if in_flight is None else in_flight,
            breaker=breaker,
            replier=Replier(consumer.queue, publisher),
            dependencies=self.dependencies or None,
            continuer=Continuer(self.app, publisher),
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
        version = BrokerVersion.from_properties(getattr(connection, "server_properties", None))
        dispatcher, acker = self.dispatcher(
            consumer, channel, publisher, breaker=breaker, version=version
        )
        running = RunningConsumer(
            consumer.queue,
            channel,
            acker,
            breaker,
            f"{self.app.name}.{consumer.queue}",
            arguments=_consume_arguments(config, version),
            cancel_reason=_cancel_reason(config, version),
        )
        for dependency in self.dependencies.of(consumer.queue):
            running.depend_on(dependency)
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
        """Stop the threads of sync handlers and the probes of stores."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.dependencies.cancel()


def _consume_arguments(config: QueueConfig, version: BrokerVersion | None) -> dict[str, Any] | None:
    # From RabbitMQ 4.3 a quorum queue takes its consumer timeout from basic.consume too: it
    # then applies even to a queue declared before consumer_timeout was set (an argument
    # cannot be added to an existing queue). Older brokers accept the argument and ignore it.
    limit = config.consumer_timeout_ms
    if (
        limit is None
        or version is None
        or not version.consumer_timeout_on_consume(config.queue_type)
    ):
        return None
    return {"x-consumer-timeout": limit}


def _cancel_reason(config: QueueConfig, version: BrokerVersion | None) -> str:
    """What a broker-sent basic.cancel most likely means for this queue on this version."""
    if version is None or not version.cancels_timed_out_consumers:
        return CANCEL_REASON
    if not version.consumer_timeout_applies(config.queue_type):
        return CANCEL_REASON
    limit = config.consumer_timeout_ms
    label = format_duration(limit) if limit is not None else "the broker's, 30m by default"
    return TIMEOUT_REASON.format(limit=label)


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
                "a handler running that long gets its channel closed by the broker (before "
                "RabbitMQ 4.3), or its delivery taken back (4.3+, quorum queues only)",
                queue=queue,
                timeout_ms=timeout,
            )
