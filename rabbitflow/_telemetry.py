"""Per-consumer handles on metrics and tracing, bound once so the hot path does no lookups."""

from __future__ import annotations

from dataclasses import dataclass

from rabbitflow._metrics import Buckets, Metrics, Value
from rabbitflow._outcome import Action
from rabbitflow._span import ConsumerSpans
from rabbitflow._tracing import Tracing


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What a dispatcher updates for each delivery of one queue."""

    in_flight: Value
    duration: Buckets
    outcomes: dict[Action, Value]
    spans: ConsumerSpans

    @classmethod
    def bind(cls, metrics: Metrics, queue: str, tracing: Tracing) -> Telemetry:
        return cls(
            in_flight=metrics.in_flight.labels(queue),
            duration=metrics.duration.histogram(queue),
            outcomes={action: metrics.consumed.labels(queue, action.value) for action in Action},
            spans=tracing.consumer_spans(queue),
        )
