"""Every exchange and queue of a file checked against the live broker before anything is
declared: ``plan`` shows the result, ``declare`` refuses to start when one object cannot be
declared, so that a file is never declared in part.

For each object a passive declare tells whether it exists (it never creates anything). An
existing object is then redeclared with the file's exact properties: RabbitMQ treats an
equivalent redeclaration as a no-op and answers a different one with PRECONDITION_FAILED
naming the first differing argument. Redeclaring again with the broker's value of that
argument finds the next one, until the redeclaration is equivalent: every argument declare
would fail on, and still nothing changed. Each difference is then classified
(:mod:`rabbitflow.topology._changes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from rabbitflow._broker_version import BrokerVersion
from rabbitflow.errors import AccessRefusedError, BrokerError, TopologyConflictError
from rabbitflow.topology._changes import Change, classify, policy_definition, verdict
from rabbitflow.topology._channels import ChannelSource, apply, exists
from rabbitflow.topology._derived import ExchangeSpec, QueueSpec
from rabbitflow.topology._management import BrokerState
from rabbitflow.topology._policies import PolicyState, policy_state

Verdict = Literal["create", "ok", "policy", "migrate", "conflict"]
_PROPERTIES = frozenset({"type", "durable", "auto_delete", "exclusive", "internal"})
_MAX_ROUNDS = 64


@dataclass(frozen=True, slots=True)
class Checked:
    """One exchange or queue of the file, as the broker has it."""

    spec: ExchangeSpec | QueueSpec
    exists: bool
    changes: tuple[Change, ...] = ()
    # What a redeclaration must send to be equivalent: the broker's values where the file's
    # differ only by a default or are carried by a policy.
    send: ExchangeSpec | QueueSpec | None = None
    # A refusal that is not an inequivalent argument (RESOURCE_LOCKED: exclusive elsewhere).
    error: str | None = None
    policy: PolicyState | None = None
    # The queue type on the broker (None: an exchange, or not known).
    broker_type: str | None = None
    # Every argument the redeclarations were refused on (classified or not).
    probed: tuple[str, ...] = ()

    @property
    def verdict(self) -> Verdict:
        if not self.exists:
            return "create"
        if self.error is not None:
            return "conflict"
        how = verdict(list(self.changes))
        if how == "same":
            return "ok"
        if how == "policy" and self.policy is not None and self.policy.blocked_by is not None:
            return "conflict"
        return how

    @property
    def policy_definition(self) -> dict[str, object]:
        """The keys rabbitflow's policy for this queue carries."""
        return policy_definition(list(self.changes))

    @property
    def policy_in_place(self) -> bool:
        return self.policy is not None and self.policy.in_place

    def detail(self) -> str:
        """The plan's text for this object's changes."""
        if self.error is not None:
            return self.error
        parts = [str(change) for change in self.changes]
        if self.verdict == "conflict" and self.policy is not None and self.policy.blocked_by:
            parts.append(self.policy.why(self.spec.name))
        return "; ".join(parts)


async def check(
    channels: ChannelSource,
    spec: ExchangeSpec | QueueSpec,
    version: BrokerVersion | None,
    state: BrokerState | None = None,
) -> Checked:
    """How ``spec`` stands on the broker; changes nothing (an existing object is only
    redeclared as it is)."""
    if not await exists(channels, spec):
        return Checked(spec, False)
    try:
        found, send = await conflicts(channels, spec)
    except AccessRefusedError:
        raise
    except BrokerError as exc:
        return Checked(spec, True, error=str(exc))
    kind: Literal["exchange", "queue"] = "exchange" if isinstance(spec, ExchangeSpec) else "queue"
    entry = _entry(state, spec)
    broker_type = _broker_type(spec, found, entry)
    changes = classify(
        [(c.argument, c.broker_value, c.file_value) for c in found],
        kind=kind,
        version=version,
        queue_type=broker_type,
    )
    policy = None
    definition = policy_definition(changes)
    if definition and state is not None:
        policy = policy_state(spec.name, broker_type or "classic", definition, state)
    probed = tuple(conflict.argument for conflict in found)
    return Checked(spec, True, tuple(changes), send, None, policy, broker_type, probed)


def _entry(state: BrokerState | None, spec: ExchangeSpec | QueueSpec) -> dict[str, Any] | None:
    if state is None:
        return None
    table = state.exchanges if isinstance(spec, ExchangeSpec) else state.queues
    return table.get(spec.name)


def _broker_type(
    spec: ExchangeSpec | QueueSpec,
    found: list[TopologyConflictError],
    entry: dict[str, Any] | None,
) -> str | None:
    if isinstance(spec, ExchangeSpec):
        return None
    if entry is not None and entry.get("type"):
        return str(entry["type"])
    for conflict in found:
        if conflict.argument == "x-queue-type":
            return str(conflict.broker_value or "classic")
    return str(spec.arguments.get("x-queue-type", "classic"))


async def conflicts(
    channels: ChannelSource, spec: ExchangeSpec | QueueSpec
) -> tuple[list[TopologyConflictError], ExchangeSpec | QueueSpec]:
    """Every argument a redeclaration of ``spec`` fails on (``spec`` exists), and the
    declaration that is equivalent to the broker's object."""
    found: list[TopologyConflictError] = []
    current = spec
    for _ in range(_MAX_ROUNDS):
        try:
            # Safe only because the object exists: an equivalent declare changes nothing, and
            # each round adopts the broker's value of the argument just reported. (Should
            # the object be deleted meanwhile, this would create it with those values.)
            await apply(channels, current)
        except TopologyConflictError as conflict:
            if any(seen.argument == conflict.argument for seen in found):
                break  # the broker's value could not be sent back as it is (its type)
            found.append(conflict)
            current = adopt(current, conflict)
        else:
            break
    return found, current


def adopt(
    spec: ExchangeSpec | QueueSpec, conflict: TopologyConflictError
) -> ExchangeSpec | QueueSpec:
    """``spec`` with the broker's value of the argument ``conflict`` names."""
    if conflict.argument in _PROPERTIES and hasattr(spec, conflict.argument):
        changes: dict[str, Any] = {conflict.argument: conflict.broker_value}
        return dataclasses.replace(spec, **changes)
    arguments = dict(spec.arguments)
    if conflict.broker_value is None:
        arguments.pop(conflict.argument, None)
    else:
        arguments[conflict.argument] = conflict.broker_value
    return dataclasses.replace(spec, arguments=arguments)
