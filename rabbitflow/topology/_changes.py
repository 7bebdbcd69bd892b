"""How each difference between a queue on the broker and the file can be resolved.

RabbitMQ never changes a queue's arguments after it is declared. What a policy can carry is
applied in place by a rabbitflow-owned policy (``policy``); what cannot (the queue type,
durability, exclusivity, an argument a policy cannot override) needs a new queue, which
``rabbitflow topology migrate`` builds while the old one keeps working (``migrate``); the
rest cannot be done for the user (``conflict``, with why).

A policy overrides a queue argument only where RabbitMQ lets it: for ``max-length``,
``max-length-bytes``, ``message-ttl``, ``expires`` and ``delivery-limit`` the lower of the
two applies; for every other key the queue's own argument wins. So a policy can add an
argument the queue lacks, or lower one of those five; it can never raise, change or remove
one the queue was declared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rabbitflow._broker_version import BrokerVersion

How = Literal["same", "policy", "migrate", "conflict"]
_RANK: dict[How, int] = {"same": 0, "policy": 1, "migrate": 2, "conflict": 3}

# The queue argument -> the policy key that carries the same setting.
POLICY_KEYS: dict[str, str] = {
    "x-message-ttl": "message-ttl",
    "x-expires": "expires",
    "x-max-length": "max-length",
    "x-max-length-bytes": "max-length-bytes",
    "x-overflow": "overflow",
    "x-dead-letter-exchange": "dead-letter-exchange",
    "x-dead-letter-routing-key": "dead-letter-routing-key",
    "x-dead-letter-strategy": "dead-letter-strategy",
    "x-delivery-limit": "delivery-limit",
    "x-max-age": "max-age",
    "x-stream-max-segment-size-bytes": "stream-max-segment-size-bytes",
    "x-queue-leader-locator": "queue-leader-locator",
    "x-consumer-timeout": "consumer-timeout",
}
# RabbitMQ applies the lower of the policy's value and the queue argument for these.
LOWER_WINS = frozenset(
    {"x-max-length", "x-max-length-bytes", "x-message-ttl", "x-expires", "x-delivery-limit"}
)
# What a queue has when the argument is not set: a difference between the two is none.
DEFAULTS: dict[str, object] = {
    "x-queue-type": "classic",
    "x-overflow": "drop-head",
    "x-dead-letter-strategy": "at-most-once",
    "x-single-active-consumer": False,
}
# Arguments rabbitflow sets because of the queue type (at-least-once dead-lettering, its
# reject-publish overflow, the delivery limit, replica placement): when the type changes they
# change with it, and naming them would hide the one change the user made.
FOLLOW_TYPE = frozenset(
    {
        "x-dead-letter-strategy",
        "x-overflow",
        "x-delivery-limit",
        "x-quorum-initial-group-size",
        "x-initial-cluster-size",
        "x-queue-leader-locator",
        "x-consumer-timeout",
    }
)
# Properties first, then the type: the order in which a conflict is named.
_FIRST = ("x-queue-type", "durable", "exclusive", "auto_delete")

STREAM_WHY = (
    "a stream is not a work queue: it keeps what was read and consumers track an offset, so "
    "its messages cannot be moved with confirm-then-ack; declare a new stream (or queue) "
    "under another name and move the consumers"
)
EXCLUSIVE_WHY = (
    "an exclusive queue belongs to the connection that declared it and goes with it: "
    "nothing to migrate; close that connection and declare again"
)


@dataclass(frozen=True, slots=True)
class Change:
    """One argument or property that differs, and how it can be resolved."""

    argument: str
    broker: object
    file: object
    how: How
    why: str = ""

    def __str__(self) -> str:
        text = f"{self.argument}: broker {show(self.broker)}, file {show(self.file)}"
        return f"{text} ({self.why})" if self.why else text


def show(value: object) -> str:
    """A value as the plan prints it (``not set`` for an argument a side does not have)."""
    return "not set" if value is None else repr(value)


def classify(
    differences: list[tuple[str, object, object]],
    *,
    kind: Literal["exchange", "queue"],
    version: BrokerVersion | None,
    queue_type: object = None,
) -> list[Change]:
    """Each ``(argument, broker value, file value)`` with how it is resolved, in the order a
    person should read them; differences that are no difference (a default on one side,
    an argument that follows a changed type) are left out. ``queue_type`` is the broker's."""
    if kind == "exchange":
        why = "an exchange cannot change in place: delete it and declare it again"
        return [Change(a, b, f, "conflict", why) for a, b, f in differences]
    found = {argument: (broker, file) for argument, broker, file in differences}
    types = found.get("x-queue-type")
    if types is not None and _same(*types, default=DEFAULTS["x-queue-type"]):
        types = None
    changes = []
    for argument, (broker, file) in found.items():
        if _same(broker, file, default=DEFAULTS.get(argument)):
            continue
        if types is not None and argument in FOLLOW_TYPE:
            continue
        changes.append(_one(argument, broker, file, types, version, queue_type == "stream"))
    order = {name: index for index, name in enumerate(_FIRST)}
    changes.sort(key=lambda change: (order.get(change.argument, len(order)), change.argument))
    return changes


def verdict(changes: list[Change]) -> How:
    """What the object needs: the hardest of its changes (``same`` when none)."""
    return max((change.how for change in changes), key=_RANK.__getitem__, default="same")


def policy_definition(changes: list[Change]) -> dict[str, object]:
    """The policy keys that carry the ``policy`` changes: ``{"max-length": 1000}``."""
    return {POLICY_KEYS[c.argument]: c.file for c in changes if c.how == "policy"}


def _one(
    argument: str,
    broker: object,
    file: object,
    types: tuple[object, object] | None,
    version: BrokerVersion | None,
    stream: bool,
) -> Change:
    stream = stream or "stream" in (types or ())
    if argument == "exclusive":
        return Change(argument, broker, file, "conflict", EXCLUSIVE_WHY)
    if argument == "x-queue-type" and "stream" in (broker, file):
        return Change(argument, broker, file, "conflict", STREAM_WHY)
    if argument in POLICY_KEYS and types is None and _policy_can(argument, broker, file, version):
        return Change(argument, broker, file, "policy")
    if stream:
        return Change(argument, broker, file, "conflict", STREAM_WHY)
    return Change(argument, broker, file, "migrate")


def _policy_can(argument: str, broker: object, file: object, version: BrokerVersion | None) -> bool:
    if file is None:
        return False  # a policy cannot take an argument away
    if argument == "x-consumer-timeout" and (version is None or not version.at_least(3, 12)):
        return False  # the consumer-timeout policy key came with RabbitMQ 3.12
    if broker is None:
        return True
    lower = isinstance(file, int) and isinstance(broker, int) and file < broker
    return argument in LOWER_WINS and lower and not isinstance(file, bool)


def _same(broker: object, file: object, *, default: object) -> bool:
    broker = default if broker is None else broker
    file = default if file is None else file
    # True == 1 in Python, but not to RabbitMQ: a bool only equals a bool.
    if isinstance(broker, bool) or isinstance(file, bool):
        return type(broker) is type(file) and broker == file
    return broker == file
