"""The start-up summary of ``rabbitflow run``: what this process consumes, and how.

One block on the console, one ``startup summary`` event in JSON; a warning when nothing will be
consumed. The worker logs it once, when it first consumes (the broker's version is known then).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from rabbitflow._breaker import Dependency
from rabbitflow._duration import format_duration
from rabbitflow._logging import get_logger, renders_json
from rabbitflow._options import WorkerOptions
from rabbitflow._tracing import Tracing
from rabbitflow._urls import mask_url
from rabbitflow.app import App
from rabbitflow.topology import Topology
from rabbitflow.topology._derived import dlq_name, tier_name

log = get_logger("rabbitflow.worker")


class Summarised(Protocol):
    """What the summary reads of a worker."""

    app: App
    topology: Topology
    options: WorkerOptions
    tracing: Tracing

    @property
    def node(self) -> str:
        """The URL of the node the worker is connected to."""

    @property
    def store_checks(self) -> list[tuple[Dependency, float | None]]:
        """Each store consumers need, and how long it took to answer at start."""


@dataclass(frozen=True, slots=True)
class ConsumerSummary:
    """One consumer: its queue and handler, flow control, retry tiers and dead-letter queue."""

    queue: str
    handler: str
    queue_type: str
    prefetch: int
    concurrency: int
    retry_delays: tuple[str, ...]
    retry_tiers: tuple[str, ...]
    max_attempts: int
    dead_letter_queue: str | None
    timeout: str | None


@dataclass(frozen=True, slots=True)
class StoreSummary:
    """A store of rabbitflow's own that consumers need, and whether it answered at start
    (``answer_ms`` None: it did not, and those consumers start paused until it does)."""

    store: str
    queues: tuple[str, ...]
    answer_ms: float | None


@dataclass(frozen=True, slots=True)
class StartupSummary:
    """What ``rabbitflow run`` prints once at start."""

    broker: str
    broker_version: str | None
    topology: str
    declare: bool
    consumers: tuple[ConsumerSummary, ...]
    not_consumed: tuple[str, ...]
    tracing: bool
    metrics: str | None
    stores: tuple[StoreSummary, ...] = ()

    def lines(self) -> list[str]:
        """The console block."""
        version = f" (RabbitMQ {self.broker_version})" if self.broker_version else ""
        mode = "declared" if self.declare else "verified, --no-declare"
        lines = [
            f"broker    {self.broker}{version}",
            f"topology  {self.topology} ({mode})",
        ]
        for c in self.consumers:
            retries = (
                f"retries after {', '.join(c.retry_delays)} "
                f"({c.queue}.retry.*), at most {c.max_attempts} attempts"
                if c.retry_delays
                else "no retries"
            )
            lines.append(f"consumer  {c.queue} -> {c.handler}")
            lines.append(
                f"          {c.queue_type}, prefetch {c.prefetch}, concurrency {c.concurrency}"
                + (f", timeout {c.timeout}" if c.timeout else "")
            )
            lines.append(f"          {retries}")
            lines.append(f"          dead letters: {c.dead_letter_queue or 'dropped (no DLQ)'}")
        for queue in self.not_consumed:
            lines.append(f"not consumed  {queue} (no handler)")
        for store in self.stores:
            state = (
                f"answered in {store.answer_ms:.1f} ms"
                if store.answer_ms is not None
                else "NOT ANSWERING: its consumers start paused until it answers"
            )
            lines.append(f"store     {store.store} for {', '.join(store.queues)}: {state}")
        lines.append(f"tracing   {'on' if self.tracing else 'off'}")
        lines.append(f"metrics   {self.metrics or 'off (--metrics-port)'}")
        return lines

    def fields(self) -> dict[str, Any]:
        """The JSON event's fields."""
        return asdict(self)


def build(worker: Summarised, broker_version: str | None = None) -> StartupSummary:
    """The summary of a worker about to consume."""
    topology = worker.topology
    consumers = []
    for queue, consumer in sorted(worker.app.consumers.items()):
        config = topology.queues[queue]
        delays = config.retry.delays_ms
        consumers.append(
            ConsumerSummary(
                queue=queue,
                handler=consumer.name,
                queue_type=config.queue_type,
                prefetch=config.prefetch,
                concurrency=config.max_in_flight,
                retry_delays=tuple(format_duration(delay) for delay in delays),
                retry_tiers=tuple(tier_name(queue, delay) for delay in delays),
                max_attempts=config.retry.max_attempts,
                dead_letter_queue=dlq_name(queue) if config.dead_letter else None,
                timeout=format_duration(config.timeout_ms) if config.timeout_ms else None,
            )
        )
    options = worker.options
    metrics = (
        f"http://{options.metrics_host}:{options.metrics_port}/metrics"
        if options.metrics_port is not None
        else None
    )
    return StartupSummary(
        # The node this worker reached, of the nodes it was given.
        broker=mask_url(worker.node),
        broker_version=broker_version,
        topology=topology.source,
        declare=options.declare,
        consumers=tuple(consumers),
        not_consumed=tuple(sorted(q for q in topology.queues if q not in worker.app.consumers)),
        tracing=worker.tracing.enabled,
        metrics=metrics,
        stores=tuple(
            StoreSummary(
                dependency.name,
                tuple(dependency.queues),
                None if seconds is None else round(seconds * 1000, 2),
            )
            for dependency, seconds in worker.store_checks
        ),
    )


def idle_reason(worker: Summarised) -> str | None:
    """Why this worker will consume nothing, or None when it will consume something."""
    if not worker.topology.queues:
        return f"{worker.topology.source} has no queues: nothing will be consumed"
    if not worker.app.consumers:
        return (
            "the app has no consumers (no @app.consumer handler): nothing will be consumed; "
            "check that MODULE:APP is the App your handlers are registered on"
        )
    return None


def warn_if_idle(worker: Summarised) -> None:
    """Log a WARNING when nothing will be consumed (at start, before connecting)."""
    reason = idle_reason(worker)
    if reason:
        log.warning(reason)


def log_summary(worker: Summarised, broker_version: str | None = None) -> None:
    """Log the start-up summary: one block on the console, one event in JSON."""
    summary = build(worker, broker_version)
    if renders_json():
        log.info("startup summary", **summary.fields())
    else:
        log.info("started\n  " + "\n  ".join(summary.lines()))
