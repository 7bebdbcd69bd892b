"""What runs beside a worker's consumers, and the points of its run where each part starts
and stops.

:class:`~rabbitflow._worker.Worker` only runs the connection: it connects, fails over,
reconnects, consumes and drains. Everything else is wired here, once, and the worker calls
:class:`Services` at fixed points of its run:

- :meth:`~Services.start`, once, before the first connection: the health server, the
  progress lines, the ``starting`` line and the warning when nothing will be consumed;
- :meth:`~Services.connected`, on each new connection as soon as it is open: the warning
  about a broker too old;
- :meth:`~Services.prepare`, on each new connection before consuming: declare the topology,
  or verify it (``--no-declare``);
- :meth:`~Services.running`, from the app's start-up hooks until the consumers are drained,
  across reconnections: the store checks, then the schedules and the outbox relay;
- :meth:`~Services.consuming`, while the consumers run on one connection: the start-up
  summary (the first time), the tier monitor, and the connection the repairer declares on;
- :meth:`~Services.stopped`, once drained and closed: the last progress lines;
- :meth:`~Services.close`, at the very end, however the run ended: the progress task and
  the health server.

``rabbitflow run`` gets them through its :class:`~rabbitflow._worker.Worker`, and so does
:func:`rabbitflow.asgi.lifespan` with ``consume=True``, which runs the same Worker in a web
process and chooses the parts with :class:`~rabbitflow._options.WorkerOptions` (no health
server unless ``metrics_port``). ``TestApp`` runs none of them: its in-memory broker declares
the topology itself, and its virtual clock drives no health server, progress lines, monitors
or schedules (``TestApp.tick`` runs a schedule's tick).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

from aio_pika.abc import AbstractConnection

from rabbitflow._breaker import Dependency
from rabbitflow._broker_version import BrokerVersion
from rabbitflow._consumers import ConsumerSet
from rabbitflow._health import HealthServer
from rabbitflow._logging import get_logger
from rabbitflow._progress import Progress
from rabbitflow._repair import Repairer
from rabbitflow._retries import TierMonitor
from rabbitflow._schedule import run_schedules
from rabbitflow._summary import Summarised, log_summary, warn_if_idle
from rabbitflow._urls import mask_urls
from rabbitflow.connection import underlay
from rabbitflow.topology._declare import declare, verify
from rabbitflow.topology._management import queue_depths, vhost_of, with_credentials

log = get_logger("rabbitflow.worker")

__all__ = ["Host", "Services"]


class Host(Summarised, Protocol):
    """What the services read of the worker they run beside."""

    consumers: ConsumerSet
    reconnections: int  # connections lost so far

    @property
    def ready(self) -> bool:
        """Connected, and every consumer consuming."""


class Services:
    """The health server, progress lines, start-up lines and summary, topology declaration,
    store checks, schedules, tier monitor and repairer of one worker."""

    def __init__(self, host: Host) -> None:
        self._host = host
        options = host.options
        consumers = host.consumers
        self._connection: AbstractConnection | None = None  # the one consumers run on
        # Each store consumers need, and how long it took to answer at start (None: not).
        self.store_checks: list[tuple[Dependency, float | None]] = []
        # The settlers call the repairer when a copy finds a queue's tiers or DLQ missing:
        # it declares them again on the connection the consumers run on.
        self.repairer = Repairer(
            lambda: self._connection, consumers.declarations, may_declare=options.declare
        )
        consumers.repairer = self.repairer
        self.tier_monitor = TierMonitor(
            [consumers.declarations.routes[queue] for queue in host.app.consumers],
            consumers.metrics,
            depths=self.queue_depths,
        )
        interval = options.progress_interval
        self.progress = (
            Progress(consumers.metrics, host.app.consumers, interval) if interval else None
        )
        self._reporting: asyncio.Future[None] | None = None
        self.health = (
            None
            if options.metrics_port is None
            else HealthServer(
                consumers.metrics, lambda: host.ready, options.metrics_host, options.metrics_port
            )
        )

    def queue_depths(self) -> Awaitable[dict[str, dict[str, int]]]:
        """The depths of the vhost's queues, from the management API of the node the worker
        is connected to, unless one is given."""
        node = self._host.node
        return queue_depths(
            with_credentials(self._host.options.management_url, node), vhost_of(node)
        )

    # -- the hooks, in the order the worker calls them -------------------------------------

    async def start(self) -> None:
        """Before the first connection."""
        host = self._host
        if self.health is not None:
            await self.health.start()
        if self.progress is not None:
            # Across reconnections: the lines say what was handled, connected or not.
            self._reporting = asyncio.ensure_future(self.progress.run())
        log.info(
            "starting",
            url=mask_urls(host.options.urls),
            queues=sorted(host.app.consumers),
            declare=host.options.declare,
            tracing=host.tracing.enabled,
        )
        warn_if_idle(host)

    def connected(self, version: BrokerVersion | None) -> None:
        """A connection is open (each one, reconnections included)."""
        if version is not None and not version.supported:
            log.warning(
                "RabbitMQ older than 3.10 is not supported: retry tiers of quorum queues "
                "need at-least-once dead-lettering",
                broker_version=str(version),
            )

    async def prepare(self, connection: AbstractConnection) -> None:
        """Before consuming on a new connection: declare the topology, or verify it."""
        declarations = self._host.consumers.declarations
        source = self._host.topology.source
        if self._host.options.declare:
            await declare(connection, declarations)
            log.info("topology declared", source=source, queues=len(declarations.queues))
        else:
            await verify(connection, declarations)
            log.info("topology verified (--no-declare)", source=source)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """From the app's start-up hooks until the consumers are drained."""
        await self.check_stores()
        async with (
            run_schedules(self._host.app.schedules.values(), self._host.options.urls),
            self._outbox_relay(),
        ):
            yield

    def _outbox_relay(self) -> contextlib.AbstractAsyncContextManager[object]:
        """The relay of the app's outbox, unless it has none or ``--no-outbox-relay``."""
        outbox = self._host.app.outbox
        if outbox is None or not self._host.options.outbox_relay:
            return contextlib.nullcontext()
        return outbox.relaying(self._host.app, self._host.consumers.metrics)

    async def check_stores(self) -> None:
        """Ask each store the consumers need to answer, all at once: one that does not is
        logged (WARNING) and its consumers start paused until it answers."""
        dependencies = list(self._host.consumers.dependencies)
        answers = await asyncio.gather(*(dependency.check() for dependency in dependencies))
        self.store_checks = list(zip(dependencies, answers, strict=True))

    @contextlib.asynccontextmanager
    async def consuming(self, connection: AbstractConnection) -> AsyncIterator[None]:
        """While the consumers run on ``connection`` (they do: the summary may say so)."""
        self._connection = connection
        amqp = underlay(connection)
        if not self._host.reconnections:
            log_summary(self._host, str(amqp.server_properties.get("version") or "") or None)
        monitor = asyncio.ensure_future(self.tier_monitor.run(amqp))
        try:
            yield
        finally:
            monitor.cancel()

    def stopped(self) -> None:
        """Drained and closed: the last progress line counts every message."""
        if self.progress is not None:
            self.progress.finish()

    async def close(self) -> None:
        """The very end of the run, however it ended."""
        if self._reporting is not None:
            self._reporting.cancel()
        if self.health is not None:
            await self.health.close()
