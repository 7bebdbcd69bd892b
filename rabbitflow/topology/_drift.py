"""How a vhost, as the management API lists it, differs from what the topology declares.

Pure functions on :class:`~rabbitflow.topology.management.BrokerState`: every differing
property and argument of an object, bindings added, changed and left over, objects the file
does not declare, and the policies that override a queue's arguments.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from rabbitflow.topology._channels import binding_detail, binding_name
from rabbitflow.topology._derived import BindingSpec, Declarations, ExchangeSpec, QueueSpec
from rabbitflow.topology._management import BrokerState

BindingAction = Literal["ok", "create", "change", "not in file"]
# For these keys RabbitMQ applies the lower of the policy's and the queue argument's value;
# for the others, which one wins depends on the key, the queue type and the version.
LOWER_WINS = frozenset(
    {"max-length", "max-length-bytes", "message-ttl", "expires", "delivery-limit"}
)
_TIER = re.compile(r"^(?P<owner>.+)\.retry\.\d+(?:ms|s|m|h)$")
_SCHEDULE = re.compile(r"^rabbitflow\.schedule\.(?P<name>.+)\.(?P<role>lease|last)$")
_OFFSET = re.compile(r"^rabbitflow\.offset\.(?P<rest>.+)$")


@dataclass(frozen=True, slots=True)
class Difference:
    """One property or argument whose value on the broker is not the file's."""

    argument: str
    broker: object
    file: object

    def __str__(self) -> str:
        return f"{self.argument}: broker {_show(self.broker)}, file {_show(self.file)}"


@dataclass(frozen=True, slots=True)
class BindingRow:
    action: BindingAction
    name: str
    detail: str


@dataclass(frozen=True, slots=True)
class Leftover:
    """An object on the broker that the file does not declare (never deleted by rabbitflow)."""

    kind: Literal["exchange", "queue"]
    name: str
    detail: str


def differences(spec: ExchangeSpec | QueueSpec, entry: dict[str, Any]) -> list[Difference]:
    """Every property and argument of ``spec`` that the broker's ``entry`` has otherwise."""
    arguments: dict[str, Any] = dict(entry.get("arguments") or {})
    wanted = dict(spec.arguments)
    found: list[Difference] = []
    if isinstance(spec, ExchangeSpec):
        properties = {
            "type": spec.type,
            "durable": spec.durable,
            "auto_delete": spec.auto_delete,
            "internal": spec.internal,
        }
    else:
        # The queue type is a property on the broker; x-queue-type is how it is declared.
        found += _compare("x-queue-type", entry.get("type"), wanted.pop("x-queue-type", "classic"))
        arguments.pop("x-queue-type", None)
        properties = {
            "durable": spec.durable,
            "auto_delete": spec.auto_delete,
            "exclusive": spec.exclusive,
        }
    for name, value in properties.items():
        found += _compare(name, entry.get(name), value)
    for name in sorted(set(arguments) | set(wanted)):
        found += _compare(name, arguments.get(name), wanted.get(name))
    return found


def _compare(name: str, broker: object, file: object) -> list[Difference]:
    return [] if _same(broker, file) else [Difference(name, broker, file)]


def _same(broker: object, file: object) -> bool:
    # True == 1 in Python, but not to RabbitMQ: a bool only equals a bool.
    if isinstance(broker, bool) or isinstance(file, bool):
        return type(broker) is type(file) and broker == file
    return broker == file


def policy_notes(
    spec: QueueSpec, entry: dict[str, Any], state: BrokerState, *, own: str | None = None
) -> str | None:
    """The policy and operator policy applied to a queue, and what they set against the
    file's arguments; None when none applies. The policy named ``own`` (rabbitflow's, which
    the queue's own row shows) is left out."""
    queue_type = str(entry.get("type", "classic"))
    notes = []
    for label, policies in (
        ("policy", state.policies),
        ("operator policy", state.operator_policies),
    ):
        applied = applied_policy(spec.name, queue_type, policies or [])
        if applied is not None and not (label == "policy" and applied.get("name") == own):
            definition: dict[str, Any] = dict(applied.get("definition") or {})
            keys = "; ".join(
                _policy_key(key, value, spec.arguments) for key, value in sorted(definition.items())
            )
            notes.append(
                f"{label} {applied['name']!r} (priority {applied.get('priority', 0)}): {keys}"
            )
    return " | ".join(notes) or None


def applied_policy(
    queue: str, queue_type: str, policies: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The policy RabbitMQ applies to ``queue``: the matching one of highest priority."""
    targets = {"queues", "all", _APPLY_TO_TYPE.get(queue_type, "")}
    matching = [
        policy
        for policy in policies
        if policy.get("apply-to", "all") in targets and _matches(policy.get("pattern", ""), queue)
    ]
    return max(matching, key=lambda policy: policy.get("priority", 0), default=None)


# RabbitMQ 4.x can aim a policy at one queue type.
_APPLY_TO_TYPE = {"classic": "classic_queues", "quorum": "quorum_queues", "stream": "streams"}


def _matches(pattern: str, name: str) -> bool:
    # RabbitMQ matches with Erlang's re (PCRE); Python's re agrees on the usual patterns.
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def _policy_key(key: str, value: object, arguments: dict[str, Any]) -> str:
    argument = f"x-{key}"
    if argument not in arguments:
        return f"{key} = {_show(value)} (the file does not set {argument})"
    mine = arguments[argument]
    if _same(value, mine):
        return f"{key} = {_show(value)} (same as the file)"
    if key in LOWER_WINS and isinstance(value, int) and isinstance(mine, int):
        if value < mine:
            return (
                f"{key} = {_show(value)} overrides {argument} = {_show(mine)} (the lower applies)"
            )
        return f"{key} = {_show(value)} has no effect: {argument} = {_show(mine)} is lower"
    return (
        f"{key} = {_show(value)} against the file's {argument} = {_show(mine)} "
        "(which applies depends on the queue type and RabbitMQ version)"
    )


def binding_rows(declarations: Declarations, state: BrokerState) -> list[BindingRow]:
    """Each binding of the file (ok, create, or change when only its key differs), then the
    broker's bindings that the file does not have."""
    wanted = [*declarations.exchange_bindings, *declarations.queue_bindings]
    present = [b for b in state.bindings if b.get("source")]  # the default exchange's are implicit
    keys = {_key_of_spec(spec) for spec in wanted}
    stale = [b for b in present if _key_of_entry(b) not in keys]
    have = {_key_of_entry(b) for b in present}
    rows: list[BindingRow] = []
    for spec in wanted:
        if _key_of_spec(spec) in have:
            rows.append(BindingRow("ok", binding_name(spec), binding_detail(spec)))
            continue
        old = next((b for b in stale if _ends(b) == _ends_of_spec(spec)), None)
        if old is None:
            rows.append(BindingRow("create", binding_name(spec), binding_detail(spec)))
            continue
        stale.remove(old)
        rows.append(
            BindingRow(
                "change",
                binding_name(spec),
                f"broker {_entry_detail(old) or 'no key'}, file {binding_detail(spec) or 'no key'}:"
                " declare adds the file's; the broker's stays until unbound by hand",
            )
        )
    rows += [
        BindingRow("not in file", f"{b['source']} -> {b['destination']}", _entry_detail(b))
        for b in stale
    ]
    return rows


def leftovers(declarations: Declarations, state: BrokerState) -> list[Leftover]:
    """Exchanges and queues of the vhost that the file does not declare."""
    exchanges = {spec.name for spec in declarations.exchanges}
    queues = {spec.name for spec in declarations.queues}
    work = {spec.name for spec in declarations.queues if spec.role == "work"}
    found = [
        Leftover("exchange", name, str(entry.get("type", "")))
        for name, entry in sorted(state.exchanges.items())
        if name and not name.startswith("amq.") and name not in exchanges
    ]
    found += [
        Leftover("queue", name, _queue_leftover(name, entry, work))
        for name, entry in sorted(state.queues.items())
        if name not in queues
    ]
    return found


def _queue_leftover(name: str, entry: dict[str, Any], work: set[str]) -> str:
    parts = [str(entry.get("type", "classic"))]
    messages = entry.get("messages")
    if isinstance(messages, int):
        parts.append(f"{messages} message{'s' if messages != 1 else ''}")
    schedule = _SCHEDULE.match(name)
    tier = _TIER.match(name)
    if schedule:
        role = "lease" if schedule["role"] == "lease" else "last tick"
        parts.append(f"rabbitflow scheduler: {role} of schedule {schedule['name']!r}")
    elif _OFFSET.match(name):
        parts.append("rabbitflow: the stored offset of a stream consumer (app.stream)")
    elif tier and tier["owner"] in work:
        parts.append(f"retry tier {tier['owner']!r} no longer uses (its delays changed)")
    elif tier:
        parts.append(f"retry tier of {tier['owner']!r}, which the file does not declare")
    elif name.endswith(".dlq") and name[: -len(".dlq")] in work:
        parts.append(f"dead-letter queue of {name[:-4]!r}, which has dead_letter = false")
    elif name.endswith(".dlq"):
        parts.append(f"dead-letter queue of {name[:-4]!r}, which the file does not declare")
    return ", ".join(parts)


def _key_of_spec(spec: BindingSpec) -> tuple[str, str, str, str, str]:
    return (*_ends_of_spec(spec), spec.routing_key, _args(spec.arguments))


def _key_of_entry(entry: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return (*_ends(entry), entry.get("routing_key", ""), _args(entry.get("arguments") or {}))


def _ends_of_spec(spec: BindingSpec) -> tuple[str, str, str]:
    return spec.source, spec.destination, spec.destination_type


def _ends(entry: dict[str, Any]) -> tuple[str, str, str]:
    return entry["source"], entry["destination"], entry.get("destination_type", "queue")


def _args(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, sort_keys=True, default=str)


def _entry_detail(entry: dict[str, Any]) -> str:
    arguments = entry.get("arguments") or {}
    if arguments:
        return ", ".join(f"{key}={value}" for key, value in arguments.items())
    key = entry.get("routing_key", "")
    return f"routing key {key!r}" if key else ""


def _show(value: object) -> str:
    return "not set" if value is None else repr(value)
