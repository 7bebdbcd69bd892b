"""OpenTelemetry: one CONSUMER span per delivery, PRODUCER spans for every publish.

The W3C trace context travels in the message headers (``traceparent``/``tracestate``), so a
message keeps one trace across its retries, its dead-lettering and a replay from the DLQ.

Configuration follows OpenTelemetry's conventions. A TracerProvider the user installed is used
as it is. Otherwise ``OTEL_TRACES_EXPORTER`` decides: ``console``, ``otlp`` (needs the
``rabbitflow[otlp]`` extra) or ``none``; unset means ``otlp`` when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and ``none`` otherwise. ``OTEL_SERVICE_NAME`` and
``OTEL_TRACES_SAMPLER`` are read by the SDK. With tracing off no span object is created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from rabbitflow._span import NO_SPANS, SYSTEM, ApiSpans, ConsumerSpans
from rabbitflow.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

_TRACE_HEADERS = ("traceparent", "tracestate")


class _HeaderGetter(Getter[dict[str, Any]]):
    """Reads trace headers that may arrive as bytes or other junk; junk is ignored."""

    def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        # A byte-array field (AMQP type "x", what Java clients send for byte[]) arrives as a
        # bytearray; an undecodable long string as bytes.
        if isinstance(value, bytes | bytearray):
            value = value.decode("latin-1")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: dict[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def _configured_provider() -> trace.TracerProvider | None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return provider  # the user installed one: respect it
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not exporter_name:
        exporter_name = "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"
    if exporter_name == "none":
        return None
    return _sdk_provider(exporter_name)


def _sdk_provider(exporter_name: str) -> trace.TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigurationError(
                "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'rabbitflow[otlp]'"
            ) from None
        exporter = OTLPSpanExporter()
    else:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported; use console, otlp or none"
        )
    provider = TracerProvider(resource=Resource.create({"service.name": _service_name()}))
    provider.add_span_processor(_batch_processor(exporter))
    trace.set_tracer_provider(provider)
    return provider


# Small batches, sent often. With the SDK's defaults (512 spans, or every 5 s) a span waits a
# quarter of a second at 2,000 msg/s: long enough to outlive the young GC generations, so the
# spans in the queue push the interpreter into full collections, each a pause of the event
# loop; and the export thread then encodes 512 spans while holding the GIL. 64 spans (or every
# 200 ms) keep both short (docs/performance.md, "The consumer span").
def _batch_processor(exporter: Any) -> BatchSpanProcessor:
    """rabbitflow's batch sizes and timing, except where an ``OTEL_BSP_*`` variable says (the
    SDK reads those when given None)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    size = None if "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" in os.environ else 64
    delay = None if "OTEL_BSP_SCHEDULE_DELAY" in os.environ else 200
    return BatchSpanProcessor(exporter, max_export_batch_size=size, schedule_delay_millis=delay)


def _service_name() -> str:
    return os.environ.get("OTEL_SERVICE_NAME", "rabbitflow")


class Tracing:
    """Spans for one process; ``tracer`` is None when tracing is off.

    ``shortcut=False`` makes every CONSUMER span through ``tracer.start_span`` even when the
    tracer is the SDK's (tests compare the two)."""

    __slots__ = ("shortcut", "tracer")

    def __init__(self, tracer: Tracer | None, *, shortcut: bool = True) -> None:
        self.tracer = tracer
        self.shortcut = shortcut

    @classmethod
    def from_environment(cls) -> Tracing:
        provider = _configured_provider()
        if provider is None:
            return cls(None)
        return cls(provider.get_tracer("rabbitflow"))

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def consumer_spans(self, queue: str) -> ConsumerSpans:
        """What opens the CONSUMER span of each delivery of ``queue`` (chosen once)."""
        if self.tracer is None:
            return NO_SPANS
        return _consumer_spans(self.tracer, queue, _GETTER, self.shortcut)

    @contextmanager
    def publish_span(
        self, exchange: str, routing_key: str, headers: dict[str, Any], message_id: str | None
    ) -> Iterator[None]:
        """A PRODUCER span around a publish; injects its context into ``headers``."""
        if self.tracer is None:
            yield
            return
        destination = exchange or "amq.default"
        with self.tracer.start_as_current_span(
            f"publish {destination}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "publish",
                "messaging.operation.name": "publish",
                "messaging.destination.name": destination,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": message_id or "",
            },
        ) as span:
            for key in _TRACE_HEADERS:
                headers.pop(key, None)
            propagate.inject(headers)
            try:
                yield
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans a batching processor still holds (``rabbitflow run`` may leave with
    ``os._exit``, which skips the SDK's own flush at exit)."""
    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if callable(force_flush):
        force_flush(timeout_ms)


_TRACING: Tracing | None = None


def get_tracing() -> Tracing:
    """The process-wide tracing set-up, built on first use."""
    global _TRACING
    if _TRACING is None:
        _TRACING = Tracing.from_environment()
    return _TRACING


def set_tracing(tracing: Tracing | None) -> None:
    """Replace the process-wide set-up (tests; a user configuring OpenTelemetry late)."""
    global _TRACING
    _TRACING = tracing


def _consumer_spans(tracer: Tracer, queue: str, getter: Any, shortcut: bool) -> ConsumerSpans:
    """The CONSUMER spans of ``queue``, made the cheapest way ``tracer`` allows."""
    if shortcut:
        from rabbitflow._span_sdk import sdk_spans

        spans = sdk_spans(tracer, queue, getter)
        if spans is not None:
            return spans
    return ApiSpans(tracer, queue, getter)
