"""The routing slip: what a workflow step's message carries in ``rabbitflow-workflow``.

Compact JSON text (after MassTransit Courier: the itinerary travels in the message, so a
chain needs no store)::

    {"f": "<workflow id>", "p": "s", "i": 1, "n": 3, "r": [["etl.load", 0]]}

``p`` is the phase of this step (``s`` a chain step, ``m`` a chord member, ``c`` a step of
the chord's callback chain), ``i`` its index in that phase, ``n`` the number of members of a
chord (0 otherwise), ``r`` the steps after it as ``[queue, delay in ms]``. A step's message
id is ``<workflow id>-<phase><index>``: the same on every publish of the same step, so a
step republished after a crash is the same message to an idempotent consumer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rabbitflow.errors import DecodeError

CHAIN = "s"
MEMBER = "m"
CALLBACK = "c"

Rest = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Slip:
    """One step's place in its workflow and the steps after it."""

    flow: str
    phase: str
    index: int
    members: int = 0
    rest: Rest = ()

    @property
    def label(self) -> str:
        """``s0``, ``m17``, ``c0``: the step within its workflow."""
        return f"{self.phase}{self.index}"

    @property
    def message_id(self) -> str:
        return f"{self.flow}-{self.label}"

    def encode(self) -> str:
        return json.dumps(
            {
                "f": self.flow,
                "p": self.phase,
                "i": self.index,
                "n": self.members,
                "r": [list(entry) for entry in self.rest],
            },
            separators=(",", ":"),
        )

    def following(self) -> Slip:
        """The slip of the next step: the first of ``rest`` (a chord member's next step is
        the callback chain's first)."""
        phase = CHAIN if self.phase == CHAIN else CALLBACK
        index = self.index + 1 if self.phase != MEMBER else 0
        return Slip(self.flow, phase, index, self.members, self.rest[1:])


def read(queue: str, value: Any) -> Slip:
    """The slip in a delivery's ``rabbitflow-workflow``; a :class:`DecodeError` of the step
    when it is not one (a header is input from any publisher)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        data = json.loads(value)
        rest = tuple((str(queue_), int(delay)) for queue_, delay in data.get("r", ()))
        slip = Slip(str(data["f"]), str(data["p"]), int(data["i"]), int(data.get("n", 0)), rest)
    except (TypeError, ValueError, KeyError) as exc:
        raise DecodeError(queue, f"rabbitflow-workflow is not a routing slip: {exc}") from None
    if slip.phase not in (CHAIN, MEMBER, CALLBACK):
        raise DecodeError(queue, f"rabbitflow-workflow has an unknown phase {slip.phase!r}")
    return slip
