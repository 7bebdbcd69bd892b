"""The consuming process: connection, one channel per consumer, graceful drain, reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractConnection

from rabbitflow._breaker import CircuitBreaker
from rabbitflow._broker_version import BrokerVersion, describe
from rabbitflow._dispatch import Dispatcher, DispatchSpec
from rabbitflow._handler import Consumer, Signature, inspect_handler
from rabbitflow._health import HealthServer
from rabbitflow._importer import exception_types
from rabbitflow._metrics import Metrics
from rabbitflow._outcome import OutcomePolicy
from rabbitflow._publisher import Publisher
from rabbitflow._repair import Repairer
from rabbitflow._retries import TierMonitor
from rabbitflow._rpc import Replier
from rabbitflow._schedule import run_schedules
from rabbitflow._settle import Acker, Settler
from rabbitflow._streams import StreamOffsets
from rabbitflow._streams.offsets import Callback
from rabbitflow._summary import log_summary, warn_if_idle
from rabbitflow._telemetry import Telemetry
from rabbitflow._tracing import get_tracing
from rabbitflow._urls import mask_url, mask_urls, split_urls
from rabbitflow.app import App
from rabbitflow.connection import connect, connected_url, underlay
from rabbitflow.errors import (
    AccessRefusedError,
    BrokerError,
    ConfigurationError,
    TlsVerificationError,
    UnreachableBrokerError,
)
from rabbitflow.topology import Declarations, Topology, derive
from rabbitflow.topology._declare import declare, verify
from rabbitflow.topology._management import management_url, queue_depths, vhost_of

log = structlog.get_logger("rabbitflow.worker")

# Longest wait for the broker to answer connection.close; a blocked connection never does.
CLOSE_TIMEOUT = 2.0
# Beyond --shutdown-timeout, what the drain may take for the broker calls that follow it:
# cancelling pending handlers (1 s), consumer cancels (0.5 s), acks (1 s per consumer, sent
# without waiting, so in practice nothing), closing the connection (CLOSE_TIMEOUT).
DRAIN_GRACE = 5.0
# RabbitMQ's default consumer_timeout: a delivery unacked for longer closes its channel.
BROKER_CONSUMER_TIMEOUT_MS = 30 * 60 * 1000


@dataclass
class WorkerOptions:
    """How a worker runs. ``url`` is one node or the nodes of one cluster, tried in order."""

    url: str | Sequence[str]
    declare: bool = True
    shutdown_timeout: float = 30.0
    heartbeat: int | None = None
    max_reconnect_wait: float = 30.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @property
    def urls(self) -> list[str]:
        """Every node, in the order they are tried."""
        return split_urls(self.url)


class _Stop(Exception):
    """Raised inside the reconnect loop when shutdown was requested."""


@dataclass
class _Session:
    """What one connection holds; dropped as a whole when the connection is lost."""

    connection: AbstractConnection
    channels: list[aiormq.abc.AbstractChannel] = field(default_factory=list)
    ackers: list[Acker] = field(default_factory=list)
    consumer_tags: dict[str, aiormq.abc.AbstractChannel] = field(default_factory=dict)
    dispatchers: dict[str, Dispatcher] = field(default_factory=dict)
    breakers: list[CircuitBreaker] = field(default_factory=list)
    offsets: list[StreamOffsets] = field(default_factory=list)
    # Set when the broker cancels a consumer (its queue was deleted): treated like a lost
    # connection, so the topology is declared (or verified) again before consuming resumes.
    cancelled: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Worker:
    """Consumes every queue of ``app`` that has a handler, until :meth:`stop`."""

    def __init__(
        self, app: App, topology: Topology, options: WorkerOptions, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        self.topology = topology
        self.options = options
        self.declarations: Declarations = derive(topology)
        self.signatures: dict[str, Signature] = {
            queue: inspect_handler(consumer) for queue, consumer in app.consumers.items()
        }
        self.policies = {
            queue: OutcomePolicy(
                topology.queues[queue].retry,
                self.declarations.routes[queue],
                consumer.retry_on
                + exception_types(topology.queues[queue].retry_on, f"queues.{queue}.retry_on"),
                consumer.dead_letter_on
                + exception_types(
                    topology.queues[queue].dead_letter_on, f"queues.{queue}.dead_letter_on"
                ),
            )
            for queue, consumer in app.consumers.items()
        }
        self.metrics = metrics or Metrics()
        self.tracing = get_tracing()
        self._ready = False
        self.finished = False  # the run is over: drained, closed, shutdown hooks run
        self.reconnections = 0
        self.paused: set[str] = set()
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._executor = ThreadPoolExecutor(
            max_workers=self._thread_count(), thread_name_prefix="rabbitflow-handler"
        )
        self._session: _Session | None = None
        self._publisher: Publisher | None = None
        self._node = 0
        self.broker_version: BrokerVersion | None = None
        self.repairer = Repairer(
            lambda: self._session.connection if self._session is not None else None,
            self.declarations,
            may_declare=options.declare,
        )
        self.tier_monitor = TierMonitor(
            [self.declarations.routes[queue] for queue in app.consumers],
            self.metrics,
            depths=self._queue_depths,
        )
        self._warn_timeouts()

    @property
    def node(self) -> str:
        """The URL of the node this worker is (or was last) connected to."""
        return self.options.urls[self._node]

    def _queue_depths(self) -> Awaitable[dict[str, dict[str, int]]]:
        # The management API of the node this worker is connected to.
        return queue_depths(management_url(self.node), vhost_of(self.node))

    def _thread_count(self) -> int:
        sync = [
            self.topology.queues[q].max_in_flight
            for q, sig in self.signatures.items()
            if not sig.is_async
        ]
        return max(1, min(sum(sync), 256))

    def _warn_timeouts(self) -> None:
        # A queue's own consumer_timeout is checked against its handler timeout by validate;
        # the broker-wide default is not known before connecting, so it is assumed here.
        for queue in self.app.consumers:
            config = self.topology.queues[queue]
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

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Request a graceful shutdown (idempotent)."""
        if not self._stopping.is_set():
            log.info(
                "shutdown requested; draining in-flight messages",
                in_flight=len(self._in_flight),
                timeout=self.options.shutdown_timeout,
            )
        self._stopping.set()

    @property
    def ready(self) -> bool:
        """Connected, and every consumer consuming (or deliberately paused by its breaker)."""
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value
        self.metrics.ready.labels().set(1 if value else 0)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Connect, declare, run the lifespan hooks and consume until stopped."""
        health = None
        if self.options.metrics_port is not None:
            health = HealthServer(
                self.metrics,
                lambda: self.ready,
                self.options.metrics_host,
                self.options.metrics_port,
            )
            await health.start()
        try:
            await self._run()
        finally:
            if health is not None:
                await health.close()

    async def _run(self) -> None:
        log.info(
            "starting",
            url=mask_urls(self.options.urls),
            queues=sorted(self.app.consumers),
            declare=self.options.declare,
            tracing=self.tracing.enabled,
        )
        warn_if_idle(self)
        # While the worker's connection is down (reconnecting, or closed before the shutdown
        # hooks run), app.publish() opens the app's own: it must go to the same broker.
        self.app.urls = self.options.urls
        try:
            connection = await self._connect()
        except _Stop:
            log.info("stopped before the first connection")
            return
        log.info(
            "connected",
            url=mask_url(connected_url(connection)),
            broker_version=describe(self.broker_version),
        )
        started = False
        try:
            await self._prepare(connection)
            async with self.app.lifespan_context():
                started = True
                # Scheduled publishing runs beside the consumers, on its own connection.
                async with run_schedules(self.app.schedules.values(), self.options.urls):
                    await self._serve(connection)
        finally:
            self.ready = False
            self.app.attach(None)
            if not started and not connection.is_closed:
                await connection.close()
            await self.app.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self.finished = True
            log.info("stopped")

    async def _connect(self, *, reconnecting: bool = False) -> AbstractConnection:
        # At start-up a refused login or vhost is a configuration error: fail fast. Once the
        # worker has run, a refusal (a connection limit reached, a vhost being recreated) is
        # retried like an unreachable broker, so a running service heals by itself.
        retried: tuple[type[Exception], ...] = (
            (UnreachableBrokerError, AccessRefusedError, TlsVerificationError)
            if reconnecting
            else (UnreachableBrokerError,)
        )
        urls = self.options.urls
        if not urls:
            raise ConfigurationError("no broker URL: give --url, RABBITFLOW_URL or [broker].url")
        # A lost node is tried last: the next one first, at once, then the whole list again
        # after a random (full-jitter) backoff that doubles up to max_reconnect_wait.
        first = (self._node + 1) % len(urls) if reconnecting else 0
        rounds = 0
        while True:
            failures: list[str] = []
            for offset in range(len(urls)):
                index = (first + offset) % len(urls)
                try:
                    connection = await connect(
                        urls[index], name=self.app.name, heartbeat=self.options.heartbeat
                    )
                except retried as exc:
                    failures.append(str(exc))
                    continue
                self._node = index
                self._note_version(connection)
                return connection
            rounds += 1
            wait = random.uniform(0, min(self.options.max_reconnect_wait, 0.5 * 2**rounds))
            log.warning(
                "broker unreachable; retrying",
                attempt=rounds,
                retry_in=round(wait, 2),
                error="; ".join(failures),
            )
            await self._sleep(wait)

    def _note_version(self, connection: AbstractConnection) -> None:
        version = BrokerVersion.of(connection)
        self.broker_version = version
        if version is not None and not version.supported:
            log.warning(
                "RabbitMQ older than 3.10 is not supported: retry tiers of quorum queues "
                "need at-least-once dead-lettering",
                broker_version=str(version),
            )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        if self._stopping.is_set():
            raise _Stop

    async def _prepare(self, connection: AbstractConnection) -> None:
        if self.options.declare:
            await declare(connection, self.declarations)
            log.info(
                "topology declared",
                source=self.topology.source,
                queues=len(self.declarations.queues),
            )
        else:
            await verify(connection, self.declarations)
            log.info("topology verified (--no-declare)", source=self.topology.source)
        self._publisher = await Publisher.open(underlay(connection))
        self.app.attach(self._publisher)

    async def _serve(self, connection: AbstractConnection) -> None:
        while True:
            lost = await self._consume(connection)
            if not lost:
                return
            self.reconnections += 1
            self.metrics.reconnections.labels().inc()
            try:
                connection = await self._reconnect()
            except _Stop:
                return
            log.info(
                "reconnected",
                reconnections=self.reconnections,
                url=mask_url(connected_url(connection)),
                broker_version=describe(self.broker_version),
            )

    async def _reconnect(self) -> AbstractConnection:
        while True:
            connection = await self._connect(reconnecting=True)
            try:
                await self._prepare(connection)
                return connection
            except Exception as exc:
                # A connection lost again while declaring is one more outage; anything the
                # broker refuses on an open connection (a conflict, a missing queue with
                # --no-declare) is for the operator and ends the run.
                if not connection.is_closed:
                    await connection.close()
                    raise
                log.warning("connection lost while declaring; retrying", error=repr(exc))
                await self._sleep(1.0)

    async def _consume(self, connection: AbstractConnection) -> bool:
        """Consume on ``connection`` until it is lost (return True) or shutdown (False)."""
        session = _Session(connection)
        self._session = session
        amqp = underlay(connection)
        try:
            for consumer in self.app.consumers.values():
                await self._start_consumer(session, amqp, consumer)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("could not start consuming", error=repr(exc))
            await self._drop(session)
            return not self._stopping.is_set()
        self.ready = True
        log.info("consuming", queues=sorted(self.app.consumers))
        if not self.reconnections:
            log_summary(self, str(amqp.server_properties.get("version") or "") or None)
        monitor = asyncio.ensure_future(self.tier_monitor.run(amqp))
        try:
            lost = await self._wait_until_lost_or_stopped(session, amqp)
        finally:
            monitor.cancel()
        self.ready = False
        if lost:
            if session.cancelled.done():
                log.warning("consumer cancelled by the broker; reconnecting", error=lost)
            else:
                log.warning("connection to the broker lost; reconnecting", error=lost)
            await self._drop(session)
            return not self._stopping.is_set()
        await self._drain(session)
        return False

    def dispatcher(
        self,
        consumer: Consumer,
        channel: aiormq.abc.AbstractChannel,
        publisher: Publisher,
        *,
        breaker: CircuitBreaker | None = None,
        executor: Executor | None = None,
        in_flight: set[asyncio.Task[Any]] | None = None,
    ) -> tuple[Dispatcher, Acker]:
        """The dispatcher (and its acker) of ``consumer`` on ``channel``, wired as in a run.

        The test kit uses it too, so tests exercise exactly this wiring."""
        config = self.topology.queues[consumer.queue]
        acker = Acker(channel, config.prefetch)
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
            in_flight=self._in_flight if in_flight is None else in_flight,
            breaker=breaker,
            replier=Replier(consumer.queue, publisher),
        )
        return dispatcher, acker

    async def _start_consumer(
        self, session: _Session, amqp: aiormq.abc.AbstractConnection, consumer: Consumer
    ) -> None:
        config = self.topology.queues[consumer.queue]
        channel = await amqp.channel(publisher_confirms=False)
        session.channels.append(channel)
        # basic.qos caps the deliveries the broker pushes before they are acked.
        await channel.basic_qos(prefetch_count=config.prefetch)
        channel.on_consumer_cancel_callbacks.add(
            lambda _frame: _fail(session.cancelled, consumer.queue)
        )
        assert self._publisher is not None
        dispatcher, acker = self.dispatcher(
            consumer,
            channel,
            self._publisher,
            breaker=self._breaker(session, channel, consumer.queue),
        )
        session.ackers.append(acker)
        tag = f"{self.app.name}.{consumer.queue}.{uuid.uuid4().hex[:8]}"
        session.dispatchers[tag] = dispatcher
        callback: Callback = dispatcher
        arguments = None
        if config.queue_type == "stream":  # resume after the last handled offset
            offsets = await StreamOffsets.open(amqp, config, self.app.name, self._publisher)
            session.offsets.append(offsets)
            callback, arguments = offsets.wrap(dispatcher), offsets.consume_arguments()
        await channel.basic_consume(consumer.queue, callback, consumer_tag=tag, arguments=arguments)
        session.consumer_tags[tag] = channel

    def _breaker(
        self, session: _Session, channel: aiormq.abc.AbstractChannel, queue: str
    ) -> CircuitBreaker | None:
        config = self.topology.queues[queue].circuit_breaker
        if config is None:
            return None
        tags: list[str] = []

        async def pause() -> None:
            # basic.cancel: the broker stops delivering; the backlog stays in the queue.
            self.paused.add(queue)
            for tag, owner in list(session.consumer_tags.items()):
                if owner is channel:
                    del session.consumer_tags[tag]
                    tags.append(tag)
                    with contextlib.suppress(Exception):
                        await channel.basic_cancel(tag)

        async def resume() -> None:
            self.paused.discard(queue)
            while tags:
                dispatcher = session.dispatchers.pop(tags.pop())
                # A fresh consumer tag: RabbitMQ before 3.10.9 / 3.11.1 crashes the channel
                # (INTERNAL_ERROR) when a quorum-queue consumer comes back under the tag it
                # just cancelled while deliveries of that tag are in flight (rabbitmq-server#5927).
                tag = f"{self.app.name}.{queue}.{uuid.uuid4().hex[:8]}"
                session.dispatchers[tag] = dispatcher
                session.consumer_tags[tag] = channel
                with contextlib.suppress(Exception):
                    await channel.basic_consume(queue, dispatcher, consumer_tag=tag)

        gauge = self.metrics.breaker.labels(queue)
        breaker = CircuitBreaker(queue, config, pause, resume, gauge)
        session.breakers.append(breaker)
        return breaker

    async def _wait_until_lost_or_stopped(
        self, session: _Session, amqp: aiormq.abc.AbstractConnection
    ) -> str | None:
        closings: list[asyncio.Future[Any]] = [amqp.closing]
        closings += [channel.closing for channel in session.channels]
        closings.append(session.cancelled)
        stop = asyncio.ensure_future(self._stopping.wait())
        watched = [asyncio.ensure_future(_settled(f)) for f in closings]
        try:
            done, _ = await asyncio.wait([stop, *watched], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in [stop, *watched]:
                future.cancel()
        if stop in done:
            return None
        for future in watched:
            if future in done and not future.cancelled():
                return future.result()
        return "closed"

    async def _drain(self, session: _Session) -> None:
        """Stop deliveries, let in-flight handlers finish within the timeout, ack, close.

        Bounded whatever the broker does: a blocked connection (memory or disk alarm) reads
        nothing, so ``basic.cancel`` and even ``connection.close`` may never be answered.
        Every broker call here has a deadline; at worst the process leaves
        ``shutdown_timeout + DRAIN_GRACE`` seconds after the stop request, and what is not
        acked by then is requeued by the broker when the connection goes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.shutdown_timeout
        # basic.cancel stops new deliveries; those already in hand stay ours to settle. The
        # cancels run beside the handlers, so a broker that never answers them costs no
        # handler its time.
        cancels = [
            asyncio.ensure_future(channel.basic_cancel(tag))
            for tag, channel in session.consumer_tags.items()
        ]
        pending = set(self._in_flight)
        if pending:
            log.info("waiting for in-flight handlers", count=len(pending))
            _, pending = await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0))
        if pending:
            log.warning(
                "shutdown timeout reached; unfinished messages go back to the queue",
                count=len(pending),
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)
        await _within(asyncio.gather(*cancels, return_exceptions=True), 0.5)
        for offsets in session.offsets:
            await _within(offsets.close(), 1.0)
        for acker in session.ackers:
            await _within(acker.close(), 1.0)
        await self._close(session)

    async def _drop(self, session: _Session) -> None:
        # Deliveries of a lost channel are requeued by the broker; their tags mean nothing on
        # a new channel, so handlers still running for them are cancelled, not settled.
        for task in list(self._in_flight):
            task.cancel()
        for acker in session.ackers:
            acker._task.cancel()
        await self._close(session)

    async def _close(self, session: _Session) -> None:
        for breaker in session.breakers:
            breaker.cancel()
        for offsets in session.offsets:
            offsets.stop()
        self.app.attach(None)
        await _within(session.connection.close(), CLOSE_TIMEOUT)


async def _within(awaitable: Awaitable[Any], seconds: float) -> None:
    """Await a broker call for at most ``seconds``; errors and silence are both given up on."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_retrieve)
    with contextlib.suppress(TimeoutError, Exception):
        await asyncio.wait_for(asyncio.shield(task), seconds)
    task.cancel()


def _retrieve(task: asyncio.Future[Any]) -> None:
    # A call given up on still ends with an error; fetching it keeps asyncio from logging it.
    if not task.cancelled():
        task.exception()


def _fail(future: asyncio.Future[None], queue: str) -> None:
    if not future.done():
        future.set_exception(
            BrokerError(f"the broker cancelled the consumer of queue {queue!r} (deleted?)")
        )


async def _settled(future: asyncio.Future[Any]) -> str:
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return repr(exc)
    return "closed by the broker"


__all__ = ["BrokerError", "Worker", "WorkerOptions"]
