"""The policies rabbitflow owns: one per queue whose change a policy can carry.

RabbitMQ applies ONE policy to a queue (the matching policy of highest priority; policies do
not merge), plus the operator policies, whose numeric limits combine with it. A rabbitflow
policy that matched a queue another policy already covers would silently take that policy's
keys away from the queue, so rabbitflow never creates one there: the plan reports the
conflict and names the user's policy, to which the key can be added by hand.

Each policy is named ``rabbitflow.<queue>``, matches exactly that queue (``^<escaped
name>$``), applies to queues only, and has priority 0: a policy of the user's with priority 1
or more that matches the queue later takes precedence on it (the next plan reports it), so
rabbitflow never clobbers the user's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rabbitflow.topology._drift import applied_policy
from rabbitflow.topology._management import BrokerState

PREFIX = "rabbitflow."
PRIORITY = 0


def policy_name(queue: str) -> str:
    """``rabbitflow.billing.order-created``."""
    return PREFIX + queue


def policy_pattern(queue: str) -> str:
    """A pattern that matches ``queue`` and no other name."""
    return "^" + re.escape(queue) + "$"


def policy_body(queue: str, definition: dict[str, object]) -> dict[str, Any]:
    """The management API's body for rabbitflow's policy of ``queue``."""
    return {
        "pattern": policy_pattern(queue),
        "definition": dict(sorted(definition.items())),
        "priority": PRIORITY,
        "apply-to": "queues",
    }


@dataclass(frozen=True, slots=True)
class PolicyState:
    """Where rabbitflow's policy of a queue stands on the broker."""

    in_place: bool
    # Another policy that applies to the queue: rabbitflow's would replace it (or lose to it).
    blocked_by: dict[str, Any] | None = None

    def why(self, queue: str) -> str:
        """For the plan and declare: why the policy cannot be applied."""
        other = self.blocked_by or {}
        return (
            f"policy {other.get('name')!r} (priority {other.get('priority', 0)}) already applies "
            f"to {queue!r} and RabbitMQ applies one policy per queue: add the key to that "
            "policy, or change its pattern to leave the queue out, then run declare again"
        )


def policy_state(
    queue: str, queue_type: str, definition: dict[str, object], state: BrokerState
) -> PolicyState:
    """Whether rabbitflow's policy of ``queue`` is in place with ``definition``, and whether
    a policy of someone else's applies to the queue."""
    ours = next((p for p in state.policies if p.get("name") == policy_name(queue)), None)
    others = [p for p in state.policies if p.get("name") != policy_name(queue)]
    blocking = applied_policy(queue, queue_type, others)
    lower = blocking is not None and int(blocking.get("priority", 0)) < PRIORITY
    if ours is not None and lower:
        blocking = None
    current: dict[str, Any] = dict((ours or {}).get("definition") or {})
    in_place = ours is not None and all(current.get(k) == v for k, v in definition.items())
    return PolicyState(in_place and blocking is None, blocking)
