"""Spans finished while a test runs, from an in-memory OpenTelemetry exporter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from rabbitflow._tracing import Tracing, set_tracing


@dataclass
class Spans:
    """Every span finished while installed as rabbitflow's tracing (and the handler's tracer)."""

    provider: TracerProvider
    exporter: InMemorySpanExporter

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def consumers(self, queue: str | None = None) -> list[ReadableSpan]:
        return [
            span
            for span in self.all()
            if span.kind is SpanKind.CONSUMER and (queue is None or span.name == f"process {queue}")
        ]

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.all() if span.name == name]

    def by_id(self, span_id: int) -> ReadableSpan:
        return next(span for span in self.all() if span.context.span_id == span_id)


@contextlib.contextmanager
def capture_spans() -> Iterator[Spans]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    set_tracing(Tracing(provider.get_tracer("test")))
    try:
        yield Spans(provider, exporter)
    finally:
        set_tracing(None)
        provider.shutdown()
