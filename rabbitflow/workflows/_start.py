"""``app.start()``: record the workflow (when the app keeps jobs), then publish its first
steps, each with its routing slip."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from rabbitflow import _clock as clock
from rabbitflow import _headers as h
from rabbitflow._duration import parse_duration
from rabbitflow.errors import WorkflowError
from rabbitflow.workflows import _jobs as jobs
from rabbitflow.workflows._flow import Flow
from rabbitflow.workflows._record import RUNNING, FlowRecord
from rabbitflow.workflows._slip import CALLBACK, CHAIN, MEMBER, Slip
from rabbitflow.workflows._store import store_of

if TYPE_CHECKING:
    from rabbitflow.app import App
    from rabbitflow.workflows._canvas import Plan, Step


async def start(app: App, plan: Plan) -> Flow:
    """Publish ``plan``'s first steps (each confirmed); its :class:`Flow`."""
    rest = tuple((later.queue, delay_ms(later)) for later in plan.then)
    store = store_of(app, required="a group or chord" if plan.chord else None)
    if store is not None:
        record = FlowRecord(
            id=plan.id,
            kind=plan.kind,
            steps=_labels(plan),
            members=len(plan.members) if plan.chord else 0,
            state=RUNNING,
            created_at=clock.now(),
        )
        await store.create(record, app.jobs.ttl_ms)
        await jobs.started(app, plan.id)
    if not plan.chord:
        first = plan.members[0]
        slip = Slip(plan.id, CHAIN, 0, 0, rest)
        await app.publish(
            "",
            first.queue,
            first.payload,
            headers=headers_for(slip, delay_ms(first)),
            message_id=slip.message_id,
        )
        return Flow(app, plan.id)
    size = len(plan.members)
    async with app.batch() as batch:
        for index, member in enumerate(plan.members):
            slip = Slip(plan.id, MEMBER, index, size, rest)
            batch.publish(
                "",
                member.queue,
                member.payload,
                headers=headers_for(slip, delay_ms(member)),
                message_id=slip.message_id,
            )
    return Flow(app, plan.id)


def headers_for(slip: Slip, delay: int) -> dict[str, Any]:
    """A step message's headers: its slip, and its not-before when it is delayed."""
    headers: dict[str, Any] = {h.WORKFLOW: slip.encode()}
    if delay > 0:
        headers[h.NOT_BEFORE] = h.not_before_after(delay)
    return headers


def delay_ms(item: Step) -> int:
    """A step's delay in milliseconds (0: none); a :class:`WorkflowError` naming the step
    when it is not a duration."""
    delay = item.delay
    if delay is None:
        return 0
    try:
        if isinstance(delay, timedelta):
            millis = round(delay.total_seconds() * 1000)
        else:
            millis = parse_duration(delay)
    except ValueError as exc:
        raise WorkflowError(f"step {item.queue!r}: delay {exc}") from None
    if millis < 0:
        raise WorkflowError(f"step {item.queue!r}: delay {delay!r} is negative")
    return millis


def _labels(plan: Plan) -> list[tuple[str, str]]:
    if plan.chord:
        steps = [(f"{MEMBER}{i}", member.queue) for i, member in enumerate(plan.members)]
        return steps + [(f"{CALLBACK}{i}", later.queue) for i, later in enumerate(plan.then)]
    everything = (*plan.members, *plan.then)
    return [(f"{CHAIN}{i}", item.queue) for i, item in enumerate(everything)]
