"""CONSUMER spans built from the parts of the OpenTelemetry SDK's ``Tracer``.

``Tracer.start_span`` and ``Span.end`` are general-purpose: a lock per span, every attribute
validated, a snapshot copy handed to the processors. For rabbitflow's own span most of that
buys nothing: one task owns the span, and rabbitflow chose the attribute types. This module does
the rest of what the SDK does, in the same order and with the same results, so that the
exported span is the one the SDK would have made (``tests/test_span_equality.py`` proves it).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from time import time_ns
from types import MappingProxyType
from typing import Any

from aiormq.abc import DeliveredMessage
from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, Tracer
from opentelemetry.sdk.trace import sampling as sdk_sampling
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.util import types

from rabbitflow._outcome import Plan
from rabbitflow._span import (
    CONSUMER,
    ROOT,
    ConsumerSpans,
    Scope,
    consume_attributes,
    delivery_attributes,
    failure_status,
    outcome,
    parent_context,
)

_UNSET = Status(StatusCode.UNSET)
_sdk_log = logging.getLogger("opentelemetry.sdk.trace")  # the SDK's warnings, from its logger
# The samplers of the SDK hand the attributes they were given back unchanged.
_PLAIN_SAMPLERS = (
    sdk_sampling.StaticSampler,
    sdk_sampling.TraceIdRatioBased,
    sdk_sampling.ParentBased,
    sdk_sampling.ParentBasedTraceIdRatio,
)
_OWN = frozenset({"rabbitflow.outcome", "rabbitflow.reason"})  # set at the end, always str


class _QuietScope:
    """A span the sampler did not record: only its context travels (to the handler's spans)."""

    __slots__ = ("_token",)

    def __init__(self, span: trace_api.Span) -> None:
        self._token = otel_context.attach(set_span_in_context(span))

    def fail(self, exc: BaseException) -> None:
        pass

    def close(self, plan: Plan | None) -> None:
        otel_context.detach(self._token)


class SdkSpans:
    """CONSUMER spans of one queue made from the parts of an SDK ``Tracer``.

    What ``Tracer.start_span`` and ``Span.end`` do, in the same order and with the same
    results: the parent from the headers, the sampler's decision (and its trace state and
    attributes), the ids from the provider's id generator, ``on_start`` / ``_on_ending`` /
    ``on_end`` on the provider's span processors. What it skips: a lock per span (one task owns
    it), validating attributes whose types rabbitflow chose, and the copy ``end`` makes."""

    __slots__ = (
        "_enabled",
        "_getter",
        "_limits",
        "_metrics",
        "_name",
        "_plain",
        "_processor",
        "_random_ids",
        "_root_decision",
        "_sampler",
        "_static",
        "_tracer",
    )

    def __init__(self, tracer: Tracer, queue: str, getter: Any) -> None:
        self._tracer = tracer
        self._getter = getter
        self._name = f"process {queue}"
        self._static = consume_attributes(queue)
        self._sampler = tracer.sampler
        self._processor = tracer.span_processor
        self._limits: SpanLimits = tracer._span_limits
        self._random_ids = tracer.id_generator.is_trace_id_random()
        # Tracer metrics and tracer configuration (enabled or not) came in SDK 1.3x.
        self._metrics = getattr(tracer, "_tracer_metrics", None)
        self._enabled = getattr(tracer, "_is_enabled", None)
        # A root span's decision, when the sampler gives every root the same one (the default,
        # parentbased_always_on, does): no sampler call for a delivery without trace context.
        self._root_decision = _static_root(self._sampler)
        # Attributes can be taken as they are when the sampler returns them unchanged and the
        # limits cannot cut them; otherwise they go through the SDK's BoundedAttributes.
        limits = self._limits
        self._plain = (
            _plain_sampler(self._sampler)
            and limits.max_span_attribute_length is None
            and (limits.max_span_attributes is None or limits.max_span_attributes >= 32)
        )

    def open(self, delivery: DeliveredMessage, attempt: int) -> Scope:
        context = parent_context(delivery.header.properties.headers, self._getter)
        parent: SpanContext | None = None
        if context is not ROOT:
            parent = trace_api.get_current_span(context).get_span_context()
            if not parent.is_valid:
                parent = None
        if self._enabled is not None and not self._enabled():
            return _QuietScope(NonRecordingSpan(parent or trace_api.INVALID_SPAN_CONTEXT))
        tracer = self._tracer
        if parent is None:
            trace_id = tracer.id_generator.generate_trace_id()
            random_id = self._random_ids
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        attributes = delivery_attributes(self._static, delivery, attempt)
        if context is ROOT and self._root_decision is not None:
            decision = self._root_decision
            trace_state = None
            sampled_attributes: Mapping[str, Any] = attributes
        else:
            result = self._sampler.should_sample(
                context, trace_id, self._name, CONSUMER, attributes, ()
            )
            decision = result.decision
            trace_state = result.trace_state
            sampled_attributes = result.attributes
        flags = TraceFlags.SAMPLED if decision.is_sampled() else TraceFlags.DEFAULT  # type: ignore[no-untyped-call]
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            tracer.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )
        end_metrics = None if self._metrics is None else self._metrics.start_span(parent, decision)
        if not decision.is_recording():  # type: ignore[no-untyped-call]
            return _QuietScope(NonRecordingSpan(span_context))
        if not self._plain:
            bounded: Mapping[str, Any] = BoundedAttributes(
                self._limits.max_span_attributes,
                sampled_attributes,
                immutable=False,
                max_value_len=self._limits.max_span_attribute_length,
            )
        else:
            bounded = attributes
        span = ConsumerSpan(self, span_context, parent, bounded, end_metrics)
        self._processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span.attach()


def _static_root(sampler: sdk_sampling.Sampler) -> sdk_sampling.Decision | None:
    if type(sampler) is sdk_sampling.StaticSampler:
        return sampler._decision
    if type(sampler) in (sdk_sampling.ParentBased, sdk_sampling.ParentBasedTraceIdRatio):
        return _static_root(sampler._root)  # type: ignore[attr-defined]
    return None


def _plain_sampler(sampler: sdk_sampling.Sampler) -> bool:
    if type(sampler) not in _PLAIN_SAMPLERS:
        return False
    if isinstance(sampler, sdk_sampling.ParentBased):
        delegates = (
            sampler._root,
            sampler._remote_parent_sampled,
            sampler._remote_parent_not_sampled,
            sampler._local_parent_sampled,
            sampler._local_parent_not_sampled,
        )
        return all(_plain_sampler(delegate) for delegate in delegates)
    return True


class ConsumerSpan(trace_api.Span, ReadableSpan):
    """A recording CONSUMER span; once ended it is the ``ReadableSpan`` the processors get.

    It is owned by the task of its delivery, so it takes no lock. Attributes that rabbitflow
    did not set itself (the handler's, through ``trace.get_current_span()``) are checked
    against the provider's limits when the span ends, as the SDK would have checked them."""

    def __init__(
        self,
        spans: SdkSpans,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: Mapping[str, Any],
        end_metrics: Any,
    ) -> None:
        # ReadableSpan's fields, set directly (its __init__ would make a Resource).
        tracer = spans._tracer
        self._spans = spans
        self._name = spans._name
        self._context = context
        self._kind = CONSUMER
        self._instrumentation_info = tracer.instrumentation_info
        self._instrumentation_scope = tracer._instrumentation_scope
        self._parent = parent
        self._resource = tracer.resource
        self._attributes: Any = attributes
        self._events: Any = ()
        self._links: Any = ()
        self._status = _UNSET
        self._end_metrics = end_metrics
        self._checked = spans._plain  # False once an attribute of unknown type is set
        self._start_time = time_ns()
        self._end_time: int | None = None
        self._token: object = None

    def attach(self) -> ConsumerSpan:
        self._token = otel_context.attach(set_span_in_context(self))
        return self

    # -- what the dispatcher calls --

    def fail(self, exc: BaseException) -> None:
        self.record_exception(exc)
        self.set_status(failure_status(exc))

    def close(self, plan: Plan | None) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]
        value, reason = outcome(plan)
        self.set_attribute("rabbitflow.outcome", value)
        if reason is not None:
            self.set_attribute("rabbitflow.reason", reason)
        self.end()

    # -- opentelemetry.trace.Span --

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            _sdk_log.warning("Setting attribute on ended span.")
            return
        attributes = self._attributes
        if isinstance(attributes, BoundedAttributes):
            attributes[key] = value
            return
        if key in attributes:  # the SDK moves a replaced key to the end
            del attributes[key]
        attributes[key] = value
        if key not in _OWN or not isinstance(value, str):
            self._checked = False

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None:
            return
        limits = self._spans._limits
        if not self._events:
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        self._events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is not None or not _valid_link(context, attributes):
            return
        limits = self._spans._limits
        if not self._links:
            self._links = BoundedList(limits.max_links)
        bounded = BoundedAttributes(
            limits.max_link_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        self._links.append(Link(context=context, attributes=bounded))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time_ns()
        if isinstance(self._attributes, BoundedAttributes):
            self._attributes._immutable = True
        elif not self._checked:
            limits = self._spans._limits
            self._attributes = BoundedAttributes(
                limits.max_span_attributes,
                self._attributes,
                immutable=True,
                max_value_len=limits.max_span_attribute_length,
            )
        if self._end_metrics:
            self._end_metrics()
        processor = self._spans._processor
        processor._on_ending(self)  # type: ignore[arg-type]
        processor.on_end(self)

    @property
    def attributes(self) -> types.Attributes:
        return MappingProxyType(self._attributes or {})

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'


def _valid_link(context: SpanContext, attributes: types.Attributes) -> bool:
    # The SDK's rule: a link needs a valid context, or attributes, or a trace state.
    return bool(context and (context.is_valid or (attributes or context.trace_state)))


def sdk_spans(tracer: trace_api.Tracer, queue: str, getter: Any) -> ConsumerSpans | None:
    """The shortcut for ``tracer`` if it is the SDK's own (of 1.3x or later, which know the
    W3C random-trace-id flag); None otherwise."""
    if type(tracer) is Tracer and hasattr(TraceFlags, "RANDOM_TRACE_ID"):
        return SdkSpans(tracer, queue, getter)
    return None
