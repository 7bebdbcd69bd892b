"""Workflows as data: ``step``, ``chain``, ``group``, ``chord`` (after Celery's canvas).

Each is a small frozen value; ``app.start(flow)`` calls its ``start``, which checks the shape
(:func:`plan`) before anything is published. What runs is decided here once:

- ``step(q, payload)`` alone is a chain of one step;
- ``chain(s1, s2, ...)``: ``s1`` takes the given payload, each later step the return value of
  the one before (a later step given a payload is refused);
- ``group(members)``: each member takes its own payload; a group alone is a chord without a
  callback;
- ``chord(group, callback)``: the callback (a step, or a chain whose first step takes it)
  runs once every member succeeded, with their results in member order.

Nesting: a chord's callback may be a chain; nothing else nests (a chain inside a chord
member, a chord inside a chain): ``app.start`` refuses it with a
:class:`~rabbitflow.errors.WorkflowError` saying how to write it instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from rabbitflow.errors import WorkflowError
from rabbitflow.workflows._start import start

if TYPE_CHECKING:
    from rabbitflow.app import App
    from rabbitflow.workflows._flow import Flow

Delay = str | int | timedelta | None


class _Nothing:
    """No payload given: the step takes the result of the step before it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOTHING"


NOTHING: Any = _Nothing()


@dataclass(frozen=True, slots=True)
class Step:
    """One handler run: the consumer of ``queue`` with ``payload`` (or the result before it),
    published no earlier than ``delay`` after the step before it finished."""

    queue: str
    payload: Any = NOTHING
    delay: Delay = None

    async def start(self, app: App) -> Flow:
        return await Chain((self,)).start(app)


@dataclass(frozen=True, slots=True)
class Chain:
    """Steps run one after the other, each taking the result of the one before."""

    steps: tuple[Step, ...]

    async def start(self, app: App) -> Flow:
        return await start(app, plan(self))


@dataclass(frozen=True, slots=True)
class Group:
    """Steps run side by side, each with its own payload."""

    members: tuple[Step, ...]

    async def start(self, app: App) -> Flow:
        return await start(app, plan(Chord(self, None)))


@dataclass(frozen=True, slots=True)
class Chord:
    """A group, then ``callback`` once with every member's result, in member order."""

    group: Group
    callback: Chain | None

    async def start(self, app: App) -> Flow:
        return await start(app, plan(self))


def step(queue: str, payload: Any = NOTHING, *, delay: Delay = None) -> Step:
    """A step of a workflow: the consumer of ``queue``. The first step of a chain and each
    member of a group take ``payload``; every other step takes the return value of the step
    before it (validated by its handler's model). ``delay`` holds the step back after the
    one before finished (``"10s"``, milliseconds or a ``timedelta``)."""
    if not isinstance(queue, str) or not queue:
        raise WorkflowError(f"a step names a consumer's queue, not {queue!r}")
    return Step(queue, payload, delay)


def chain(*steps: Step | Chain) -> Chain:
    """Steps run one after the other: ``chain(step("a", x), step("b"), step("c"))``."""
    flat: list[Step] = []
    for item in steps:
        if isinstance(item, Chain):
            flat.extend(item.steps)
        elif isinstance(item, Step):
            flat.append(item)
        else:
            raise WorkflowError(_nesting("a chain", item))
    if not flat:
        raise WorkflowError("a chain needs at least one step")
    return Chain(tuple(flat))


def group(*members: Step | Iterable[Step]) -> Group:
    """Steps run side by side: ``group(step("thumbs.make", Img(id=i)) for i in ids)``, or
    ``group(step(...), step(...))``."""
    flat: list[Any] = []
    for item in members:
        if isinstance(item, Step | Chain | Group | Chord):
            flat.append(item)
        else:
            flat.extend(item)
    for item in flat:
        if not isinstance(item, Step):
            raise WorkflowError(_nesting("a group member", item))
    if not flat:
        raise WorkflowError("a group needs at least one member")
    return Group(tuple(flat))


def chord(members: Group | Iterable[Step], callback: Step | Chain) -> Chord:
    """``callback`` runs once, with the results of every member of ``members`` in member
    order, after they all succeeded."""
    header = members if isinstance(members, Group) else group(members)
    if isinstance(callback, Step):
        callback = Chain((callback,))
    elif not isinstance(callback, Chain):
        raise WorkflowError(_nesting("a chord's callback", callback))
    return Chord(header, callback)


@dataclass(frozen=True, slots=True)
class Plan:
    """A checked workflow: its first steps (the members of a chord, or a chain's first
    step) and what follows them (a chain's rest, or the callback chain)."""

    id: str
    members: tuple[Step, ...]
    then: tuple[Step, ...]
    chord: bool

    @property
    def kind(self) -> str:
        return "chord" if self.chord else "chain"


def plan(flow: Chain | Chord) -> Plan:
    """The workflow checked: a later step with a payload, or a missing one, is refused."""
    flow_id = uuid.uuid4().hex
    if isinstance(flow, Chain):
        first, *rest = flow.steps
        _check_later(rest)
        return Plan(flow_id, (first,), tuple(rest), chord=False)
    for index, member in enumerate(flow.group.members):
        if member.payload is NOTHING:
            raise WorkflowError(
                f"member {index} of the group ({member.queue!r}) has no payload: each member "
                "takes its own, step(queue, payload)"
            )
    then = flow.callback.steps if flow.callback is not None else ()
    _check_later(then)
    return Plan(flow_id, flow.group.members, tuple(then), chord=True)


def _check_later(steps: Iterable[Step]) -> None:
    for later in steps:
        if later.payload is not NOTHING:
            raise WorkflowError(
                f"step {later.queue!r} is given a payload, but it takes the return value of "
                "the step before it: write step(queue) (only a chain's first step and a "
                "group's members take a payload)"
            )


def _nesting(where: str, item: object) -> str:
    kind = type(item).__name__.lower()
    if isinstance(item, Chord | Group):
        return (
            f"{where} cannot be a {kind}: rabbitflow runs a chord's callback as a chain, and "
            "nothing else nested; start the inner workflow from a step's handler "
            "(await app.start(...)) instead"
        )
    if isinstance(item, Chain):
        return (
            f"{where} cannot be a chain: a member is one step; chain the work inside the "
            "member's handler, or make the chain the chord's callback"
        )
    return f"{where} must be a step (rabbitflow.step), not {kind}"
