"""The CONSUMER span of one delivery, chosen once per consumer.

Three ways to make it, picked at start-up:

- tracing off: :data:`NO_SPANS`, whose scope does nothing;
- the user's provider is the OpenTelemetry SDK's: ``_span_sdk.SdkSpans`` builds the span from the
  provider's own parts (its sampler, id generator, resource, limits and span processors) and
  skips the general-purpose work of ``Tracer.start_span`` (locks, attribute validation of values
  rabbitflow itself typed, a snapshot copy at the end). The exported span is the one the SDK
  would have made;
- any other provider: :class:`ApiSpans` goes through the API (``tracer.start_span``).

Whichever way, the span is current while the handler runs and while the message is settled:
the handler's own spans, its log lines and a retry, deferral or dead-letter copy (whose headers
carry this trace on) all nest under it.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiormq.abc import DeliveredMessage
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from rabbitflow._outcome import Action, Plan

SYSTEM = "rabbitmq"
ROOT = otel_context.Context()  # no parent: a delivery without trace context starts a trace
CONSUMER = SpanKind.CONSUMER


class Scope(Protocol):
    """One delivery's span while its message is handled and settled."""

    def fail(self, exc: BaseException) -> None: ...

    def close(self, plan: Plan | None) -> None: ...


class ConsumerSpans(Protocol):
    """Opens the span of each delivery of one queue."""

    def open(self, delivery: DeliveredMessage, attempt: int) -> Scope: ...


class _NoScope:
    __slots__ = ()

    def fail(self, exc: BaseException) -> None:
        pass

    def close(self, plan: Plan | None) -> None:
        pass


class _NoSpans:
    __slots__ = ()

    def open(self, delivery: DeliveredMessage, attempt: int) -> Scope:
        return _NO_SCOPE


_NO_SCOPE = _NoScope()
NO_SPANS: ConsumerSpans = _NoSpans()


def consume_attributes(queue: str) -> dict[str, Any]:
    """The attributes every CONSUMER span of ``queue`` has (built once per consumer)."""
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.rabbitmq.queue": queue,
    }


def delivery_attributes(
    static: dict[str, Any], delivery: DeliveredMessage, attempt: int
) -> dict[str, Any]:
    props = delivery.header.properties
    return {
        **static,
        "messaging.destination.name": delivery.exchange or "amq.default",
        "messaging.rabbitmq.destination.routing_key": delivery.routing_key or "",
        "messaging.message.id": props.message_id or "",
        "messaging.message.conversation_id": props.correlation_id or "",
        "messaging.message.body.size": len(delivery.body),
        "rabbitflow.attempt": attempt,
    }


def parent_context(headers: dict[str, Any] | None, getter: Any) -> otel_context.Context:
    # A message without headers carries no context: skip the propagators' work.
    return propagate.extract(headers, getter=getter) if headers else ROOT


def outcome(plan: Plan | None) -> tuple[str, str | None]:
    if plan is None:
        return "cancelled", None
    return plan.action.value, None if plan.action is Action.ACK else plan.reason


def failure_status(exc: BaseException) -> Status:
    return Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:1024])


# -- any provider: the API ------------------------------------------------------------------


class _ApiScope:
    __slots__ = ("_span", "_token")

    def __init__(self, span: trace_api.Span) -> None:
        self._span = span
        self._token = otel_context.attach(set_span_in_context(span))

    def fail(self, exc: BaseException) -> None:
        self._span.record_exception(exc)
        self._span.set_status(failure_status(exc))

    def close(self, plan: Plan | None) -> None:
        otel_context.detach(self._token)
        value, reason = outcome(plan)
        self._span.set_attribute("rabbitflow.outcome", value)
        if reason is not None:
            self._span.set_attribute("rabbitflow.reason", reason)
        self._span.end()


class ApiSpans:
    """CONSUMER spans through ``tracer.start_span``: for providers other than the SDK's."""

    __slots__ = ("_getter", "_name", "_static", "_tracer")

    def __init__(self, tracer: trace_api.Tracer, queue: str, getter: Any) -> None:
        self._tracer = tracer
        self._getter = getter
        self._name = f"process {queue}"
        self._static = consume_attributes(queue)

    def open(self, delivery: DeliveredMessage, attempt: int) -> Scope:
        span = self._tracer.start_span(
            self._name,
            context=parent_context(delivery.header.properties.headers, self._getter),
            kind=CONSUMER,
            attributes=delivery_attributes(self._static, delivery, attempt),
        )
        return _ApiScope(span)
