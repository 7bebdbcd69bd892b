"""rabbitflow's own CONSUMER span (built from the SDK's parts) exports exactly what the SDK's
``Tracer.start_span`` path exports.

The same deliveries run twice on the in-memory broker, once with the shortcut and once through
the API, with a provider whose id generator counts, so that even trace and span ids match.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from rabbitflow import App, Message, Reject
from rabbitflow._span import ApiSpans
from rabbitflow._span_sdk import SdkSpans
from rabbitflow._tracing import Tracing, _batch_processor, set_tracing
from rabbitflow.testing import TestApp

TOPOLOGY = """
[queues.orders]
retry = { delays = ["1s"], max_attempts = 2 }

[queues.strict]
retry = false
"""
SAMPLED_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED_PARENT = "00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203332-00"


class Counting(IdGenerator):
    """Ids 1, 2, 3…: both runs draw them in the same order, so they must get the same ones."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def generate_span_id(self) -> int:
        return next(self._next)

    def generate_trace_id(self) -> int:
        return next(self._next) << 64


def exported(span: ReadableSpan) -> dict[str, Any]:
    """Everything an exporter sends, without the clock readings."""
    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind,
        "context": (
            span.context.trace_id,
            span.context.span_id,
            int(span.context.trace_flags),
            span.context.trace_state.to_header(),
        ),
        "parent": None if span.parent is None else (span.parent.span_id, span.parent.is_remote),
        "attributes": dict(span.attributes or {}),
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
        "events": [(event.name, dict(event.attributes or {})) for event in span.events],
        "links": [(link.context.span_id, dict(link.attributes or {})) for link in span.links],
        "status": (span.status.status_code, span.status.description),
        "resource": dict(span.resource.attributes),
        "scope": span.instrumentation_scope,
        "ended": span.end_time is not None and span.start_time is not None,
    }


def build_app(provider: TracerProvider, seen: list[Any]) -> App:
    handler_tracer = provider.get_tracer("orders.handler", "1.0")
    app = App(name="spans")

    @app.consumer("orders")
    async def orders(body: dict[str, Any], message: Message) -> None:
        current = trace.get_current_span()
        seen.append(current.get_span_context())
        current.set_attribute("order.id", body["id"])
        current.add_event("looked up", {"found": True})
        with handler_tracer.start_as_current_span("charge card") as child:
            child.set_attribute("amount", 12.5)
        if body.get("fail_first") and message.attempt == 1:
            raise ConnectionError("card service unavailable")

    @app.consumer("strict")
    def strict(body: dict[str, Any]) -> None:
        seen.append(trace.get_current_span().get_span_context())
        raise Reject("no such customer")

    return app


async def run(
    tmp_path: Path,
    *,
    shortcut: bool,
    sampler: Sampler | None = None,
    limits: SpanLimits | None = None,
) -> Any:
    provider = TracerProvider(
        sampler=sampler or ParentBased(TraceIdRatioBased(1.0)),
        resource=Resource.create({"service.name": "billing", "deployment": "test"}),
        id_generator=Counting(),
        span_limits=limits,
    )
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("rabbitflow", "9.9"), shortcut=shortcut)
    seen: list[Any] = []
    path = tmp_path / f"topology-{shortcut}.toml"
    path.write_text(TOPOLOGY)
    set_tracing(tracing)
    try:
        async with TestApp(build_app(provider, seen), path) as t:
            # Published untraced: the headers below are the only trace context.
            set_tracing(Tracing(None))
            await t.publish("", "orders", {"id": 1}, message_id="m1")
            await t.publish("", "orders", {"id": 2, "fail_first": True}, message_id="m2")
            await t.publish(
                "", "orders", {"id": 3}, message_id="m3", headers={"traceparent": SAMPLED_PARENT}
            )
            await t.publish(
                "",
                "orders",
                {"id": 4},
                message_id="m4",
                correlation_id="c4",
                headers={"traceparent": UNSAMPLED_PARENT, "tracestate": "vendor=x"},
            )
            await t.publish("", "strict", {"id": 5}, message_id="m5")
            await t.drain()
    finally:
        set_tracing(None)
    provider.shutdown()
    return [exported(span) for span in exporter.get_finished_spans()], seen


@pytest.fixture(autouse=True)
def _reset_tracing() -> Iterator[None]:
    yield
    set_tracing(None)


@pytest.mark.parametrize(
    ("limit", "sampler"),
    [
        (None, ParentBased(ALWAYS_ON)),
        (None, ParentBased(TraceIdRatioBased(1.0))),
        (11, ParentBased(ALWAYS_ON)),
    ],
    ids=["default", "ratio-sampler", "11-attributes"],
)
async def test_the_shortcut_exports_the_spans_the_sdk_exports(
    tmp_path: Path, limit: int | None, sampler: Sampler
) -> None:
    # given the same deliveries: plain, failing once then retried, with a sampled and an
    # unsampled traceparent, and one rejected; each handler opens a child span and writes on
    # the consumer span
    limits = SpanLimits(max_span_attributes=limit) if limit else None
    # when they run through the SDK's start_span and through rabbitflow's shortcut
    through_sdk, sdk_seen = await run(tmp_path, shortcut=False, sampler=sampler, limits=limits)
    shortcut, shortcut_seen = await run(tmp_path, shortcut=True, sampler=sampler, limits=limits)

    # then the exported spans are the same, field for field, ids included
    assert shortcut == through_sdk
    assert shortcut_seen == sdk_seen
    consumers = [s for s in shortcut if s["kind"] is trace.SpanKind.CONSUMER]
    children = [s for s in shortcut if s["name"] == "charge card"]
    # the unsampled parent records nothing: 2 + 1 retry + 1 sampled parent + 1 rejected
    assert len(consumers) == 5
    assert len(children) == 4
    by_span = {s["context"][1]: s for s in consumers}
    assert all(c["parent"] is not None and c["parent"][0] in by_span for c in children)
    failed = [s for s in consumers if s["status"][0] is trace.StatusCode.ERROR]
    assert {s["attributes"]["rabbitflow.outcome"] for s in failed} == {"retry", "dead_letter"}
    assert all("exception" in [name for name, _ in s["events"]] for s in failed), (
        "a failure is recorded as an exception event"
    )
    remote = [s for s in consumers if s["parent"] is not None]
    assert [s["parent"] for s in remote] == [(0xB7AD6B7169203331, True)]
    # a limit on attributes cuts the consumer spans in both ways alike
    assert all((s["dropped"][0] > 0) is bool(limit) for s in consumers)
    # the handler under the unsampled parent saw that trace, not sampled
    unsampled = [ctx for ctx in shortcut_seen if ctx.trace_id == 0x0AF7651916CD43DD8448EB211C80319D]
    assert len(unsampled) == 1
    assert not unsampled[0].trace_flags.sampled


async def test_a_sampler_that_drops_everything_exports_nothing_either_way(
    tmp_path: Path,
) -> None:
    # given a provider whose sampler records nothing
    # when the deliveries run both ways
    through_sdk, sdk_seen = await run(tmp_path, shortcut=False, sampler=ALWAYS_OFF)
    shortcut, shortcut_seen = await run(tmp_path, shortcut=True, sampler=ALWAYS_OFF)

    # then nothing is exported, and the handlers still ran inside the same (unsampled) traces
    assert shortcut == through_sdk == []
    assert shortcut_seen == sdk_seen
    assert shortcut_seen
    assert all(ctx.is_valid and not ctx.trace_flags.sampled for ctx in shortcut_seen)


def test_the_shortcut_is_taken_only_for_the_sdks_own_tracer() -> None:
    # given the SDK's tracer, the same with the shortcut off, and the API's no-op tracer
    sdk_tracer = TracerProvider().get_tracer("rabbitflow")

    # then only the first builds spans from the SDK's parts; the others use the API
    assert isinstance(Tracing(sdk_tracer).consumer_spans("q"), SdkSpans)
    assert isinstance(Tracing(sdk_tracer, shortcut=False).consumer_spans("q"), ApiSpans)
    assert isinstance(Tracing(trace.NoOpTracer()).consumer_spans("q"), ApiSpans)


def test_rabbitflows_own_batch_processor_exports_small_batches_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given no OTEL_BSP_* variables, then one of them set
    monkeypatch.delenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", raising=False)
    monkeypatch.delenv("OTEL_BSP_SCHEDULE_DELAY", raising=False)
    ours = _batch_processor(InMemorySpanExporter())
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "256")
    told = _batch_processor(InMemorySpanExporter())
    try:
        # then rabbitflow sends 64 spans at a time or every 200 ms, and the SDK reads the
        # variable the user set
        assert ours._batch_processor._max_export_batch_size == 64
        assert ours._batch_processor._schedule_delay == 0.2
        assert told._batch_processor._max_export_batch_size == 256
        assert told._batch_processor._schedule_delay == 0.2
    finally:
        ours.shutdown()
        told.shutdown()
