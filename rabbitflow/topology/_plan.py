"""What ``declare`` would do, and how the broker differs from the file, without changing it.

For each exchange and queue a passive declare tells whether it exists (it never creates
anything). An existing object is then redeclared with the file's exact properties: RabbitMQ
treats an equivalent redeclaration as a no-op and answers a different one with
PRECONDITION_FAILED naming the first differing argument. Redeclaring again with the broker's
value of that argument finds the next one, until the redeclaration is equivalent: every
argument declare would fail on, and still nothing changed.

AMQP cannot list a vhost, its bindings or its policies. When the management HTTP API answers
(:mod:`rabbitflow.topology.management`), the plan also compares every binding, lists the
objects the file does not declare ("not in file", never deleted), the policies applied to
each queue, and arguments that differ although RabbitMQ does not compare them (declare keeps
the broker's value: "differs").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from rabbitflow._broker_version import BrokerVersion
from rabbitflow.errors import TopologyConflictError
from rabbitflow.topology._declare import ChannelSource, Kind, Target, describe
from rabbitflow.topology._derived import (
    BindingSpec,
    Declarations,
    ExchangeSpec,
    QueueSpec,
    consumer_timeout_use,
    for_broker,
)
from rabbitflow.topology._drift import (
    Difference,
    binding_rows,
    differences,
    leftovers,
    policy_notes,
)
from rabbitflow.topology._management import BrokerState
from rabbitflow.topology._policies import policy_name
from rabbitflow.topology._preflight import check

Action = Literal[
    "create", "ok", "conflict", "migrate", "differs", "bind", "change", "policy", "not in file"
]
ACTIONS: tuple[Action, ...] = (
    "create",
    "ok",
    "conflict",
    "migrate",
    "bind",
    "differs",
    "change",
    "policy",
    "not in file",
)
# Rows that say the broker is not what the file describes (``plan --exit-code`` exits 2).
DIFFERENT: frozenset[Action] = frozenset(
    {"create", "conflict", "migrate", "differs", "change", "policy", "not in file"}
)


@dataclass(frozen=True, slots=True)
class PlanItem:
    """One row of the plan: ``conflict queue q  x-message-ttl: broker 1000, file 2000``."""

    action: Action
    kind: Kind
    name: str
    detail: str = ""
    conflicts: tuple[TopologyConflictError, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """Every exchange and queue, then policies, bindings and what the file does not declare.

    ``unseen`` says what could not be compared (no management API), for the user."""

    items: tuple[PlanItem, ...]
    unseen: str | None = None
    notes: tuple[str, ...] = ()
    # How settings that differ per RabbitMQ version take effect on this broker, per queue.
    uses: tuple[str, ...] = ()

    @property
    def conflicts(self) -> list[PlanItem]:
        """Rows that cannot be resolved for the user (declare fails on them)."""
        return [item for item in self.items if item.action == "conflict"]

    @property
    def migrations(self) -> list[PlanItem]:
        """Queues that only ``rabbitflow topology migrate`` can change (declare fails)."""
        return [item for item in self.items if item.action == "migrate"]

    @property
    def differences(self) -> list[PlanItem]:
        """Rows where the broker is not what the file describes."""
        return [item for item in self.items if item.action in DIFFERENT]

    def counts(self) -> dict[Action, int]:
        """How many rows per action: the AMQP-only actions always, the others when present."""
        counter = Counter(item.action for item in self.items)
        always: tuple[Action, ...] = ("create", "ok", "conflict")
        shown = [*always, *(a for a in ACTIONS if a not in always and counter[a])]
        if self.unseen is not None and "bind" not in shown:
            shown.append("bind")
        return {action: counter[action] for action in shown}

    def action_of(self, kind: Kind, name: str) -> Action:
        """The action planned for one object; ``KeyError`` if it is not in the topology."""
        for item in self.items:
            if item.kind == kind and item.name == name:
                return item.action
        raise KeyError(f"{kind} {name!r}")


async def plan(
    target: Target, declarations: Declarations, state: BrokerState | None = None
) -> Plan:
    """Compare the topology with the live broker without creating or changing anything.

    ``state`` is the vhost as the management API lists it (see
    :func:`~rabbitflow.topology.management.read_state`); without it bindings are listed as
    ``bind`` and objects not in the file are not seen. Raises
    :class:`~rabbitflow.errors.AccessRefusedError` or :class:`~rabbitflow.errors.BrokerError`
    when the broker refuses to be looked at."""
    channels = ChannelSource(target)
    items: list[PlanItem] = []
    try:
        version = await channels.version()
        uses = _version_notes(declarations, version)
        declarations = for_broker(declarations, version)
        objects: list[ExchangeSpec | QueueSpec] = [*declarations.exchanges, *declarations.queues]
        for spec in objects:
            items.append(await _plan_object(channels, spec, version, state))
    finally:
        await channels.close()
    if state is None:
        bindings = (*declarations.exchange_bindings, *declarations.queue_bindings)
        return Plan((*items, *map(_plan_binding, bindings)), unseen=UNSEEN, uses=uses)
    items += _policies(declarations, state)
    items += [
        PlanItem(row.action, "binding", row.name, row.detail)
        for row in binding_rows(declarations, state)
    ]
    items += [
        PlanItem("not in file", x.kind, x.name, x.detail) for x in leftovers(declarations, state)
    ]
    notes = () if state.operator_policies is not None else (OPERATOR_POLICIES_UNSEEN,)
    return Plan(tuple(items), notes=notes, uses=uses)


def _version_notes(declarations: Declarations, version: BrokerVersion | None) -> tuple[str, ...]:
    # What takes effect differs per version for some settings (consumer_timeout): said once
    # per queue, so that nobody reads a missing argument as drift.
    if version is None:
        return ()
    uses = ((spec.name, consumer_timeout_use(spec, version)) for spec in declarations.queues)
    return tuple(f"queue {name}: {use} (RabbitMQ {version})" for name, use in uses if use)


OPERATOR_POLICIES_UNSEEN = (
    "operator policies are not shown: listing them needs the administrator tag"
)
UNSEEN = (
    "bindings are not compared (listed as bind), and objects not in the file, policies and "
    "arguments RabbitMQ does not compare on redeclaration are not shown"
)


def _entry(state: BrokerState | None, spec: ExchangeSpec | QueueSpec) -> dict[str, Any] | None:
    if state is None:
        return None
    table = state.exchanges if isinstance(spec, ExchangeSpec) else state.queues
    return table.get(spec.name)


async def _plan_object(
    channels: ChannelSource,
    spec: ExchangeSpec | QueueSpec,
    version: BrokerVersion | None,
    state: BrokerState | None,
) -> PlanItem:
    described = describe(spec)
    checked = await check(channels, spec, version, state)
    verdict = checked.verdict
    if verdict == "create":
        return PlanItem("create", described.kind, spec.name, described.detail)
    named = set(checked.probed)
    retyped = any(change.argument == "x-queue-type" for change in checked.changes)
    unchecked = _unchecked(spec, _entry(state, spec))
    others = [] if retyped else [d for d in unchecked if d.argument not in named]
    if verdict == "ok" or (verdict == "policy" and checked.policy_in_place):
        if checked.changes:
            detail = "; ".join(
                f"{c.argument} {c.file!r} by policy {policy_name(spec.name)!r}"
                for c in checked.changes
                if c.how == "policy"
            )
            return PlanItem("ok", described.kind, spec.name, detail)
        if others:
            detail = "; ".join(map(str, others))
            detail += " (RabbitMQ does not compare these: declare keeps the broker's values)"
            return PlanItem("differs", described.kind, spec.name, detail)
        return PlanItem("ok", described.kind, spec.name, described.detail)
    detail = checked.detail()
    if verdict == "policy":
        detail += f" (declare applies policy {policy_name(spec.name)!r})"
    elif verdict == "migrate":
        detail += " (needs `rabbitflow topology migrate`)"
    if others:
        detail += "; also differs, not compared by RabbitMQ: " + "; ".join(map(str, others))
    return PlanItem(verdict, described.kind, spec.name, detail)


def _unchecked(spec: ExchangeSpec | QueueSpec, entry: dict[str, Any] | None) -> list[Difference]:
    # Redeclaration passed, so RabbitMQ compared what it compares; anything still different
    # (an argument it does not know, such as x-consumer-timeout before 3.12) stays as it is.
    return [] if entry is None else differences(spec, entry)


def _policies(declarations: Declarations, state: BrokerState) -> list[PlanItem]:
    items = []
    for spec in declarations.queues:
        entry = state.queues.get(spec.name)
        own = policy_name(spec.name)
        notes = policy_notes(spec, entry, state, own=own) if entry is not None else None
        if notes is not None:
            items.append(PlanItem("policy", "queue", spec.name, notes))
    return items


def _plan_binding(spec: BindingSpec) -> PlanItem:
    described = describe(spec)
    return PlanItem("bind", "binding", described.name, described.detail)
