"""A workflow's record as its store keeps it, and the states and answers stores share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Workflow states, as jobs name them (contract section 12).
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
PENDING = "pending"

# What record() tells a chord member.
WAIT = 0  # members are missing: nothing more to do
CLAIM = 1  # the set is complete and this member publishes the callback
UNKNOWN = -1  # the store does not know the workflow (expired, or another store)


@dataclass(slots=True)
class FlowRecord:
    """A workflow as its store keeps it: ``steps`` are ``(label, queue)`` in order,
    ``done`` the labels of the steps that succeeded, ``failed`` the label of the step in the
    DLQ and ``error`` its error."""

    id: str
    kind: str
    steps: list[tuple[str, str]]
    members: int = 0
    state: str = RUNNING
    done: set[str] = field(default_factory=set)
    failed: str | None = None
    error: str | None = None
    result: str | None = None
    cancelled: bool = False
    published: bool = False
    created_at: float = 0.0
    finished_at: float | None = None

    def state_of(self, label: str) -> str:
        """``succeeded``, ``failed``, ``cancelled`` or ``pending`` (not run yet, or running)."""
        if label in self.done:
            return SUCCEEDED
        if label == self.failed:
            return FAILED
        return CANCELLED if self.cancelled else PENDING

    def step_states(self) -> list[dict[str, Any]]:
        """Each step as ``{"step", "queue", "state", "error"}``, in order."""
        return [
            {
                "step": label,
                "queue": queue,
                "state": self.state_of(label),
                "error": self.error if label == self.failed else None,
            }
            for label, queue in self.steps
        ]
