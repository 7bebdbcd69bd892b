"""Golden-signal metrics in Prometheus text format.

The hot path touches only pre-bound children (an attribute and an integer add): everything
runs on the event loop thread, so no locks are needed, and label dictionaries are never
built per message. Rendering happens on scrape.

This registry is rabbitflow's own because it is cheaper per message than prometheus_client's
(docs/performance.md, "Metrics cost"). A user's own prometheus_client metrics are served
beside it: :meth:`Metrics.exposition` appends the output of prometheus_client's default
``REGISTRY`` (or the registry given as ``App(metrics_registry=...)``) when prometheus_client
is installed (``pip install rabbitflow[prometheus]``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    parts = []
    for name, value in zip(names, values, strict=True):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{name}="{escaped}"')
    return "{" + ",".join(parts) + "}"


class Value:
    """One labelled counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Buckets:
    """One labelled histogram."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Metric:
    """A metric family with fixed label names."""

    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = DURATION_BUCKETS,
    ) -> None:
        self.name = name
        self.help = help_text
        self.kind = kind
        self.label_names = labels
        self.bucket_bounds = buckets
        self.children: dict[tuple[str, ...], Value | Buckets] = {}
        if not labels and kind != "histogram":
            # An unlabelled series is exported at 0 from the start: Prometheus cannot see the
            # first increase of a series that appears with the value 1 (rate() and increase()
            # start from its first sample), and an absent rabbitflow_ready is not a 0.
            self.children[()] = Value()

    def labels(self, *values: str) -> Value:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Value()
        assert isinstance(child, Value)
        return child

    def histogram(self, *values: str) -> Buckets:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Buckets(self.bucket_bounds)
        assert isinstance(child, Buckets)
        return child

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for values, child in sorted(self.children.items()):
            if isinstance(child, Value):
                yield f"{self.name}{_labels(self.label_names, values)} {child.value:g}"
                continue
            cumulative = 0
            names = (*self.label_names, "le")
            for bound, count in zip((*child.bounds, float("inf")), child.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                yield f"{self.name}_bucket{_labels(names, (*values, le))} {cumulative}"
            suffix = _labels(self.label_names, values)
            yield f"{self.name}_sum{suffix} {child.sum:g}"
            yield f"{self.name}_count{suffix} {child.count}"


class Metrics:
    """Every metric rabbitflow exports, and the user's prometheus_client registry to serve
    beside them (``registry``; None: prometheus_client's default ``REGISTRY``, if installed)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._others = _exposer(registry)
        self.consumed = Metric(
            "rabbitflow_messages_total",
            "Deliveries settled, by queue and outcome (ack, retry, deferred, dead_letter, dropped, "
            "requeued, expired).",
            "counter",
            ("queue", "outcome"),
        )
        self.duration = Metric(
            "rabbitflow_handler_duration_seconds",
            "Handler run time per delivery.",
            "histogram",
            ("queue",),
        )
        self.in_flight = Metric(
            "rabbitflow_in_flight_messages", "Deliveries being handled now.", "gauge", ("queue",)
        )
        self.retries = Metric(
            "rabbitflow_retries_total",
            "Messages republished to a retry tier.",
            "counter",
            ("queue", "tier"),
        )
        self.dead_lettered = Metric(
            "rabbitflow_dead_lettered_total",
            "Messages sent to the dead-letter queue.",
            "counter",
            ("queue", "error_type"),
        )
        self.publish_failures = Metric(
            "rabbitflow_copy_publish_failures_total",
            "Retry, deferral or dead-letter copies the broker did not confirm (the original "
            "went back to its queue), by queue and planned action.",
            "counter",
            ("queue", "action"),
        )
        self.tier_messages = Metric(
            "rabbitflow_retry_tier_messages",
            "Messages waiting in a retry tier (ready), read by passive declares.",
            "gauge",
            ("queue", "tier"),
        )
        self.dlq_messages = Metric(
            "rabbitflow_dlq_messages",
            "Messages in a dead-letter queue (ready), read by passive declares.",
            "gauge",
            ("queue",),
        )
        self.held_messages = Metric(
            "rabbitflow_broker_held_messages",
            "Messages a quorum queue has dead-lettered but its dead-letter target has not "
            "taken yet (the management API's messages_dlx): in no queue. Work queues, tiers "
            "and DLQs; needs the management API.",
            "gauge",
            ("queue",),
        )
        self.reconnections = Metric(
            "rabbitflow_reconnections_total", "Broker reconnections.", "counter"
        )
        self.breaker = Metric(
            "rabbitflow_circuit_breaker_open",
            "1 while a consumer's circuit breaker is open or half-open.",
            "gauge",
            ("queue",),
        )
        self.store_up = Metric(
            "rabbitflow_store_up",
            "1 while a store of rabbitflow's own (idempotency) answers; 0 while it does not "
            "and the consumers that need it are paused.",
            "gauge",
            ("store",),
        )
        self.store_outages = Metric(
            "rabbitflow_store_outages_total",
            "Times a store of rabbitflow's own stopped answering (each paused its consumers).",
            "counter",
            ("store",),
        )
        self.ready = Metric("rabbitflow_ready", "1 when every consumer is consuming.", "gauge")
        self.outbox_pending = Metric(
            "rabbitflow_outbox_pending_rows",
            "Outbox rows committed and not yet confirmed by the broker (read every 5 s).",
            "gauge",
            ("table",),
        )
        self.outbox_oldest_age = Metric(
            "rabbitflow_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending outbox row: the relay's lag (read every 5 s).",
            "gauge",
            ("table",),
        )
        self.outbox_parked = Metric(
            "rabbitflow_outbox_parked_rows",
            "Outbox rows the broker refused on every attempt, waiting for `rabbitflow outbox "
            "retry` or `purge`.",
            "gauge",
            ("table",),
        )
        self.outbox_published = Metric(
            "rabbitflow_outbox_published_total",
            "Outbox rows this process's relay published (confirmed by the broker).",
            "counter",
            ("table",),
        )

    def all(self) -> tuple[Metric, ...]:
        return (
            self.consumed,
            self.duration,
            self.in_flight,
            self.retries,
            self.dead_lettered,
            self.publish_failures,
            self.tier_messages,
            self.dlq_messages,
            self.held_messages,
            self.reconnections,
            self.breaker,
            self.store_up,
            self.store_outages,
            self.ready,
            self.outbox_pending,
            self.outbox_oldest_age,
            self.outbox_parked,
            self.outbox_published,
        )

    def render(self) -> str:
        """rabbitflow's own metrics in the Prometheus text format."""
        return "\n".join(line for metric in self.all() for line in metric.render()) + "\n"

    def exposition(self) -> str:
        """What ``/metrics`` serves: :meth:`render`, then the user's registry, if any."""
        own = self.render()
        return own if self._others is None else own + self._others()


def _exposer(registry: CollectorRegistry | None) -> Callable[[], str] | None:
    """How to render the user's registry, chosen once; None without prometheus_client."""
    try:
        from prometheus_client import REGISTRY, generate_latest
    except ImportError:
        if registry is not None:  # pragma: no cover - a registry implies prometheus_client
            raise
        return None
    chosen = REGISTRY if registry is None else registry
    return lambda: generate_latest(chosen).decode("utf-8")
