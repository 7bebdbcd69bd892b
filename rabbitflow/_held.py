"""Messages held by the broker's dead-lettering, for ``dlq list``, ``retries list`` and the
console.

A quorum queue that dead-letters at-least-once keeps each message it dead-letters until the
target queue confirms it. While the target refuses (deleted, over a ``reject-publish``
length limit), those messages are in no queue: no AMQP method and no passive declare sees
them. Only the management API counts them, as the source queue's ``messages_dlx``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rabbitflow.errors import ManagementUnavailable
from rabbitflow.topology._management import (
    queue_depths,
    vhost_of,
    with_credentials,
)

# What the listings call them, and where an operator reads how they are released.
LABEL = "held by the broker's dead-lettering"
DOCS = "docs/recoverability.md#dead-letters-the-broker-holds"
TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Held:
    """Held messages per queue of one vhost, or why they could not be counted."""

    counts: dict[str, int] = field(default_factory=dict)
    problem: str | None = None

    def of(self, queue: str) -> int | None:
        """How many ``queue`` holds; None when unknown (no management API)."""
        if self.problem is not None:
            return None
        return self.counts.get(queue, 0)


async def read_held(amqp_url: str, api_url: str | None = None) -> Held:
    """The ``messages_dlx`` of every queue in the vhost of ``amqp_url``.

    ``api_url`` is the management API (default: ``RABBITFLOW_MANAGEMENT_URL``'s caller
    passes it; else port 15672 of the broker's host), with the AMQP URL's credentials when it
    names none."""
    api = with_credentials(api_url, amqp_url)
    try:
        depths = await queue_depths(api, vhost_of(amqp_url), timeout=TIMEOUT)
    except ManagementUnavailable as exc:
        return Held(problem=f"management API at {exc}")
    return Held({name: row["messages_dlx"] for name, row in depths.items()})


def note(held: Held, queues: list[str]) -> list[str]:
    """The lines a listing prints about ``queues``: one per queue that holds messages, or
    why nothing could be counted; nothing when none holds any."""
    if held.problem is not None:
        return [f"{LABEL}: not checked ({held.problem})"]
    return [
        f"{queue}: {LABEL}: {count} (in no queue; see {DOCS})"
        for queue in queues
        if (count := held.counts.get(queue, 0))
    ]
