"""What happens after a workflow step's handler: the next step, or the chord's barrier.

Installed into the core (:mod:`rabbitflow._continuation`) when rabbitflow.workflows is
imported. Everything here runs before the step's message is acked: a next step or callback
is confirmed by the broker first, so a crash at any point redelivers the step, which
publishes its next step again (the same message id) or records its result again (kept once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pydantic_core
from aiormq.abc import DeliveredMessage
from opentelemetry import trace

from rabbitflow import _headers as h
from rabbitflow._logging import get_logger
from rabbitflow._payload import JSON
from rabbitflow._tracing import get_tracing
from rabbitflow.errors import Reject, StoreUnavailableError
from rabbitflow.workflows import _jobs as jobs
from rabbitflow.workflows._record import CLAIM, UNKNOWN
from rabbitflow.workflows._slip import MEMBER, Slip, read
from rabbitflow.workflows._start import headers_for
from rabbitflow.workflows._store import FlowStore, store_of

if TYPE_CHECKING:
    from rabbitflow._publisher import Publisher
    from rabbitflow.app import App

log = get_logger("rabbitflow.workflows")


class WorkflowSteps:
    """The :class:`~rabbitflow._continuation.Steps` of rabbitflow's workflows."""

    __slots__ = ()

    async def succeeded(
        self, app: App, publisher: Publisher, delivery: DeliveredMessage, result: object
    ) -> None:
        slip = _slip_of(delivery)
        store = store_of(app)
        if store is not None and h.REPLAY_COUNT in (delivery.header.properties.headers or {}):
            # Replayed from the DLQ: the workflow that failed at this step goes on.
            jobs.resumed(app, slip.flow)
        if slip.phase == MEMBER:
            if await _member(_required(store, slip), publisher, slip, result):
                jobs.succeeded(app, slip.flow, None)
            return
        if not slip.rest:
            if store is not None:  # the workflow's result, kept with its status
                body = _final_json(slip, result)
                await _done(store, slip, body)
                jobs.succeeded(app, slip.flow, body)
            return
        if store is None or not await _cancelled(store, slip):
            await _publish_next(publisher, slip, result, None)
        await _done(store, slip, None)

    async def dead_lettered(
        self, app: App, delivery: DeliveredMessage, error: BaseException
    ) -> None:
        slip = _slip_of(delivery)
        store = store_of(app)
        if store is None:
            log.error(
                "workflow step dead-lettered",
                workflow=slip.flow,
                step=slip.label,
                queue=delivery.routing_key,
                error=h.error_type(error),
            )
            return
        detail = f"{h.error_type(error)}: {h.keep_head(str(error), h.ERROR_MESSAGE_LIMIT)}"
        step = f"{slip.label} ({delivery.routing_key})"
        jobs.failed(app, slip.flow, step, detail, h.error_type(error))
        await store.fail(slip.flow, slip.label, detail)


async def _member(store: FlowStore, publisher: Publisher, slip: Slip, result: object) -> bool:
    """Record a chord member's result; the claimant publishes the callback. Whether the
    workflow is finished (a group's last member)."""
    # Kept with the result: the member's span, which the callback's span links to.
    outcome = await store.record(slip.flow, slip.index, _traced(_json(slip, result)))
    if outcome == UNKNOWN:
        log.error(
            "chord member finished, but the store does not know its workflow (expired?)",
            workflow=slip.flow,
            step=slip.label,
        )
        return False
    if outcome != CLAIM:
        return False
    if slip.rest and not await store.is_cancelled(slip.flow):
        spans, results = _untraced(await store.results(slip.flow))
        with _linked(slip, spans):
            await _publish_next(publisher, slip, b"[" + b",".join(results) + b"]", JSON)
    await store.published(slip.flow, finished=not slip.rest)
    return not slip.rest


async def _publish_next(
    publisher: Publisher, slip: Slip, payload: object, content_type: str | None
) -> None:
    queue, delay = slip.rest[0]
    following = slip.following()
    try:
        await publisher.publish(
            "",
            queue,
            payload,
            headers=headers_for(following, delay),
            message_id=following.message_id,
            content_type=content_type,
        )
    except TypeError as exc:
        # The handler returned something with no wire form: running it again cannot help.
        raise Reject(f"step {slip.label} of workflow {slip.flow}: {exc}") from None


async def _done(store: FlowStore | None, slip: Slip, result: bytes | None) -> None:
    """A chain step's status: its failure delays the workflow's status, never the workflow
    (the next step is confirmed already)."""
    if store is None:
        return
    try:
        await store.step_done(slip.flow, slip.label, result)
    except StoreUnavailableError as exc:
        log.warning(
            "workflow status not written", workflow=slip.flow, step=slip.label, error=str(exc)
        )


async def _cancelled(store: FlowStore, slip: Slip) -> bool:
    try:
        return await store.is_cancelled(slip.flow)
    except StoreUnavailableError:
        return False  # the workflow goes on; a cancel is honoured from the next step


def _required(store: FlowStore | None, slip: Slip) -> FlowStore:
    if store is None:
        raise Reject(
            f"step {slip.label} of workflow {slip.flow} is a chord member, but this app keeps "
            "no jobs store: App(..., jobs=RedisStore(...))"
        )
    return store


def _slip_of(delivery: DeliveredMessage) -> Slip:
    headers = delivery.header.properties.headers or {}
    return read(delivery.routing_key or "", headers.get(h.WORKFLOW))


def _final_json(slip: Slip, result: object) -> bytes:
    """The last step's result for the workflow's status; ``null`` (and a warning) when it
    has no JSON form: the step succeeded, only its result cannot be kept."""
    try:
        return pydantic_core.to_json(result)
    except pydantic_core.PydanticSerializationError as exc:
        log.warning("workflow result not kept: not JSON", workflow=slip.flow, error=str(exc))
        return b"null"


def _json(slip: Slip, result: object) -> bytes:
    try:
        return pydantic_core.to_json(result)
    except pydantic_core.PydanticSerializationError as exc:
        raise Reject(f"step {slip.label} of workflow {slip.flow}: {exc}") from None


def _traced(body: bytes) -> bytes:
    """``traceparent`` of the current span, a newline, ``body`` (no traceparent untraced)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return b"\n" + body
    flags = int(context.trace_flags)
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}\n".encode() + body


def _untraced(stored: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    spans, results = [], []
    for value in stored:
        span, _, body = value.partition(b"\n")
        spans.append(span)
        results.append(body)
    return spans, results


@contextlib.contextmanager
def _linked(slip: Slip, spans: list[bytes]) -> Iterator[None]:
    """A span around the callback's publish, linked to every member's span: the callback's
    CONSUMER span is its grandchild (through the PRODUCER span of the publish)."""
    tracer = get_tracing().tracer
    if tracer is None:
        yield
        return
    links = [link for link in map(_link, spans) if link is not None]
    with tracer.start_as_current_span(
        f"chord {slip.flow} callback",
        links=links,
        attributes={"rabbitflow.workflow.id": slip.flow, "rabbitflow.workflow.members": len(spans)},
    ):
        yield


def _link(traceparent: bytes) -> trace.Link | None:
    parts = traceparent.split(b"-")
    if len(parts) != 4:
        return None
    try:
        context = trace.SpanContext(
            int(parts[1], 16),
            int(parts[2], 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(parts[3], 16)),
        )
    except ValueError:
        return None
    return trace.Link(context) if context.is_valid else None
