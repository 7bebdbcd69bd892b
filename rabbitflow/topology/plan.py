"""What ``declare`` would do, found out without changing the broker.

For each exchange and queue: a passive declare tells whether it exists (it never creates
anything). An existing object is then redeclared with the file's exact properties: RabbitMQ
treats an equivalent redeclaration as a no-op and answers a different one with
PRECONDITION_FAILED, which names the first differing argument. That is the only way AMQP
offers to compare arguments. Bindings cannot be observed over AMQP; they are listed as
``bind``, which is idempotent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from rabbitflow.errors import AccessRefusedError, BrokerError, TopologyConflictError
from rabbitflow.topology.declare import (
    ChannelSource,
    Kind,
    Target,
    apply,
    describe,
    exists,
)
from rabbitflow.topology.derived import BindingSpec, Declarations, ExchangeSpec, QueueSpec

Action = Literal["create", "ok", "conflict", "bind"]
ACTIONS: tuple[Action, ...] = ("create", "ok", "conflict", "bind")


@dataclass(frozen=True, slots=True)
class PlanItem:
    """One row of the plan: ``conflict queue q  x-message-ttl: broker 1000, file 2000``."""

    action: Action
    kind: Kind
    name: str
    detail: str = ""
    conflict: TopologyConflictError | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Every exchange and queue, then every binding, with what declare would do."""

    items: tuple[PlanItem, ...]

    @property
    def conflicts(self) -> list[PlanItem]:
        """Rows on which declare would fail."""
        return [item for item in self.items if item.action == "conflict"]

    def counts(self) -> dict[Action, int]:
        """How many rows per action, every action present."""
        counter = Counter(item.action for item in self.items)
        return {action: counter[action] for action in ACTIONS}

    def action_of(self, kind: Kind, name: str) -> Action:
        """The action planned for one object; ``KeyError`` if it is not in the topology."""
        for item in self.items:
            if item.kind == kind and item.name == name:
                return item.action
        raise KeyError(f"{kind} {name!r}")


async def plan(target: Target, declarations: Declarations) -> Plan:
    """Compare the topology with the live broker without creating or changing anything.

    Raises :class:`~rabbitflow.errors.AccessRefusedError` or
    :class:`~rabbitflow.errors.BrokerError` when the broker refuses to be looked at."""
    channels = ChannelSource(target)
    items: list[PlanItem] = []
    try:
        objects: list[ExchangeSpec | QueueSpec] = [*declarations.exchanges, *declarations.queues]
        for spec in objects:
            items.append(await _plan_object(channels, spec))
    finally:
        await channels.close()
    items += map(_plan_binding, (*declarations.exchange_bindings, *declarations.queue_bindings))
    return Plan(tuple(items))


async def _plan_object(channels: ChannelSource, spec: ExchangeSpec | QueueSpec) -> PlanItem:
    described = describe(spec)
    if not await exists(channels, spec):
        return PlanItem("create", described.kind, spec.name, described.detail)
    try:
        # Safe only because the object exists: an equivalent declare changes nothing.
        # (Should it be deleted between the two calls, this would create it.)
        await apply(channels, spec)
    except TopologyConflictError as conflict:
        detail = f"{conflict.argument}: broker {_show(conflict.broker_value)}, "
        detail += f"file {_show(conflict.file_value)}"
        return PlanItem("conflict", described.kind, spec.name, detail, conflict)
    except AccessRefusedError:
        raise
    except BrokerError as exc:
        # e.g. RESOURCE_LOCKED: an exclusive flag that differs; declare would fail the same way.
        return PlanItem("conflict", described.kind, spec.name, str(exc))
    return PlanItem("ok", described.kind, spec.name, described.detail)


def _plan_binding(spec: BindingSpec) -> PlanItem:
    described = describe(spec)
    return PlanItem("bind", "binding", described.name, described.detail)


def _show(value: object) -> str:
    return "not set" if value is None else repr(value)
