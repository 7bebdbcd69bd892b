"""The consuming process: connection, one channel per consumer, graceful drain, reconnection.

What runs beside the consumers (health server, start-up lines and summary, topology
declaration, store checks, schedules, tier monitor, repairer, progress lines) is
:class:`rabbitflow._services.Services`, which the worker calls at fixed points of its run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection

from rabbitflow._backoff import full_jitter
from rabbitflow._breaker import Dependency
from rabbitflow._broker_version import BrokerVersion, describe
from rabbitflow._consumers import ConsumerSet, RunningConsumer
from rabbitflow._logging import get_logger
from rabbitflow._metrics import Metrics
from rabbitflow._options import WorkerOptions
from rabbitflow._publisher import Publisher
from rabbitflow._retries import TierMonitor
from rabbitflow._services import Services
from rabbitflow._urls import mask_url
from rabbitflow.app import App
from rabbitflow.connection import connect, connected_url, underlay
from rabbitflow.errors import (
    AccessRefusedError,
    BrokerError,
    ConfigurationError,
    TlsVerificationError,
    UnreachableBrokerError,
)
from rabbitflow.topology import Topology

log = get_logger("rabbitflow.worker")

# Longest wait for the broker to answer connection.close; a blocked connection never does.
CLOSE_TIMEOUT = 2.0
# Beyond --shutdown-timeout, what the drain may take for the broker calls that follow it:
# cancelling pending handlers (1 s), consumer cancels (0.5 s), acks (1 s per consumer, sent
# without waiting, so in practice nothing), closing the connection (CLOSE_TIMEOUT).
DRAIN_GRACE = 5.0
# What one consumer may take, once its handlers are done, to store its stream offset, and
# then again to send its acks.
SETTLE_TIMEOUT = 1.0


class _Stop(Exception):
    """Raised inside the reconnect loop when shutdown was requested."""


class Worker:
    """Consumes every queue of ``app`` that has a handler, until :meth:`stop`."""

    def __init__(
        self, app: App, topology: Topology, options: WorkerOptions, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        self.topology = topology
        self.options = options
        self.consumers = ConsumerSet.build(app, topology, metrics=metrics)
        self.declarations = self.consumers.declarations
        self.metrics = self.consumers.metrics
        self.tracing = self.consumers.tracing
        self._ready = False
        self.finished = False  # the run is over: drained, closed, shutdown hooks run
        self.reconnections = 0
        self._stopping = asyncio.Event()
        self._running: list[RunningConsumer] = []  # the consumers on the latest connection
        self._publisher: Publisher | None = None
        self._node = 0
        self.broker_version: BrokerVersion | None = None
        # What runs beside the consumers (rabbitflow._services), called at fixed points.
        self.services = Services(self)

    @property
    def node(self) -> str:
        """The URL of the node this worker is (or was last) connected to."""
        return self.options.urls[self._node]

    # The services' parts, as the worker showed them before they moved to Services.
    @property
    def tier_monitor(self) -> TierMonitor:
        return self.services.tier_monitor

    @property
    def store_checks(self) -> list[tuple[Dependency, float | None]]:
        return self.services.store_checks

    def _check_stores(self) -> Awaitable[None]:
        return self.services.check_stores()

    def _queue_depths(self) -> Awaitable[dict[str, dict[str, int]]]:
        return self.services.queue_depths()

    @property
    def paused(self) -> set[str]:
        """The queues paused: by their circuit breaker, or for a store that does not answer."""
        return {consumer.queue for consumer in self._running if consumer.paused}

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Request a graceful shutdown (idempotent)."""
        if not self._stopping.is_set():
            log.info(
                "shutdown requested; draining in-flight messages",
                in_flight=len(self.consumers.in_flight),
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
        try:
            await self.services.start()
            await self._run()
        finally:
            await self.services.close()

    async def _run(self) -> None:
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
                async with self.services.running():
                    await self._serve(connection)
        finally:
            self.ready = False
            self.app.attach(None)
            if not started and not connection.is_closed:
                await connection.close()
            await self.app.close()
            self.consumers.close()
            self.services.stopped()
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
                self.broker_version = BrokerVersion.of(connection)
                self.services.connected(self.broker_version)
                return connection
            rounds += 1
            wait = full_jitter(rounds + 1, base=0.5, cap=self.options.max_reconnect_wait)
            log.warning(
                "broker unreachable; retrying",
                attempt=rounds,
                retry_in=round(wait, 2),
                error="; ".join(failures),
            )
            await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        if self._stopping.is_set():
            raise _Stop

    async def _prepare(self, connection: AbstractConnection) -> None:
        await self.services.prepare(connection)
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
        self._running = []
        amqp = underlay(connection)
        assert self._publisher is not None
        try:
            self._running = await self.consumers.start(amqp, self._publisher)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("could not start consuming", error=repr(exc))
            await self._drop(connection)
            return not self._stopping.is_set()
        self.ready = True
        log.info("consuming", queues=sorted(self.app.consumers))
        async with self.services.consuming(connection):
            lost = await self._wait_until_lost_or_stopped(amqp)
        self.ready = False
        if lost:
            if any(consumer.cancelled.done() for consumer in self._running):
                log.warning("consumer cancelled by the broker; reconnecting", error=lost)
            else:
                log.warning("connection to the broker lost; reconnecting", error=lost)
            await self._drop(connection)
            return not self._stopping.is_set()
        await self._drain(connection)
        return False

    async def _wait_until_lost_or_stopped(self, amqp: aiormq.abc.AbstractConnection) -> str | None:
        closings: list[asyncio.Future[Any]] = [amqp.closing]
        closings += [consumer.channel.closing for consumer in self._running]
        closings += [consumer.cancelled for consumer in self._running]
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

    async def _drain(self, connection: AbstractConnection) -> None:
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
        cancels = [asyncio.ensure_future(consumer.cancel()) for consumer in self._running]
        pending = set(self.consumers.in_flight)
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
        for consumer in self._running:
            await _within(consumer.save_offset(), SETTLE_TIMEOUT)
        for consumer in self._running:
            await _within(consumer.drain(), SETTLE_TIMEOUT)
        for consumer in self._running:
            consumer.close()
        await self._close(connection)

    async def _drop(self, connection: AbstractConnection) -> None:
        # Deliveries of a lost channel are requeued by the broker; their tags mean nothing on
        # a new channel, so handlers still running for them are cancelled, not settled (each
        # counts one loss against its message: see rabbitflow._settle.Losses).
        self.consumers.cancel_handlers()
        for consumer in self._running:
            consumer.drop()
        await self._close(connection)

    async def _close(self, connection: AbstractConnection) -> None:
        self.app.attach(None)
        await _within(connection.close(), CLOSE_TIMEOUT)


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


async def _settled(future: asyncio.Future[Any]) -> str:
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return repr(exc)
    return "closed by the broker"


__all__ = ["BrokerError", "Worker", "WorkerOptions"]
