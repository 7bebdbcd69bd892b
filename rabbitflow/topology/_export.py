"""The topology in other formats: RabbitMQ definitions JSON and a Mermaid flowchart.

Both read :func:`rabbitflow.topology._derived.derive`'s result, so they show exactly the
objects ``declare`` creates.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from rabbitflow._duration import format_duration
from rabbitflow.topology._derived import BindingSpec, Declarations, ExchangeSpec, QueueSpec


class ExportWarning(UserWarning):
    """Something of the topology that an export format cannot carry."""


def definitions(declarations: Declarations, vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions (``rabbitmqctl import_definitions FILE``) for one vhost.

    The vhost itself is not included: importing a vhost entry would reset its metadata, and
    creating it is an administrator's decision. Exclusive queues are skipped with an
    :class:`ExportWarning`: they live only as long as the connection that declared them."""
    skipped = exclusive_queues(declarations)
    for name in skipped:
        warnings.warn(
            f"queue {name!r} is exclusive and cannot be exported to definitions: "
            "it exists only while the connection that declares it is open",
            ExportWarning,
            stacklevel=2,
        )
    bindings = (*declarations.exchange_bindings, *declarations.queue_bindings)
    return {
        "exchanges": [_exchange(spec, vhost) for spec in declarations.exchanges],
        "queues": [_queue(q, vhost) for q in declarations.queues if q.name not in skipped],
        "bindings": [_binding(b, vhost) for b in bindings if not _to_skipped(b, skipped)],
    }


def exclusive_queues(declarations: Declarations) -> list[str]:
    """Names of the exclusive queues, which definitions cannot hold."""
    return [spec.name for spec in declarations.queues if spec.exclusive]


def _to_skipped(binding: BindingSpec, skipped: list[str]) -> bool:
    return binding.destination_type == "queue" and binding.destination in skipped


def _exchange(spec: ExchangeSpec, vhost: str) -> dict[str, Any]:
    return {
        "name": spec.name,
        "vhost": vhost,
        "type": spec.type,
        "durable": spec.durable,
        "auto_delete": spec.auto_delete,
        "internal": spec.internal,
        "arguments": dict(spec.arguments),
    }


def _queue(spec: QueueSpec, vhost: str) -> dict[str, Any]:
    return {
        "name": spec.name,
        "vhost": vhost,
        "durable": spec.durable,
        "auto_delete": spec.auto_delete,
        "arguments": dict(spec.arguments),
    }


def _binding(spec: BindingSpec, vhost: str) -> dict[str, Any]:
    return {
        "source": spec.source,
        "vhost": vhost,
        "destination": spec.destination,
        "destination_type": spec.destination_type,
        "routing_key": spec.routing_key,
        "arguments": dict(spec.arguments),
    }


def mermaid(declarations: Declarations) -> str:
    """A ``flowchart LR``: exchanges → queues → retry tiers → back, and DLX → DLQs."""
    ids = _NodeIds()
    lines = ["flowchart LR"]
    lines += _exchange_nodes(declarations, ids)
    lines += (_queue_node(spec, ids) for spec in declarations.queues)
    lines += (_binding_edge(spec, ids) for spec in declarations.exchange_bindings)
    lines += (_binding_edge(spec, ids) for spec in declarations.queue_bindings)
    lines += _failure_edges(declarations, ids)
    return "\n".join(lines) + "\n"


class _NodeIds:
    """Mermaid node ids; names with dots cannot be ids. Exchanges and queues have separate
    namespaces in RabbitMQ, so each kind gets its own prefix."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], str] = {}

    def __call__(self, kind: str, name: str) -> str:
        key = (kind, name)
        if key not in self._ids:
            self._ids[key] = f"{kind[0]}{len(self._ids)}"
        return self._ids[key]


def _label(text: str) -> str:
    escaped = text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    return f'"{escaped}"'


def _exchange_nodes(declarations: Declarations, ids: _NodeIds) -> Iterator[str]:
    declared = {spec.name: spec.type for spec in declarations.exchanges}
    bindings = (*declarations.exchange_bindings, *declarations.queue_bindings)
    # Built-in exchanges (amq.topic...) are bound to but not declared; show them too.
    for binding in bindings:
        declared.setdefault(binding.source, "built-in")
    for name, kind in declared.items():
        yield f"    {ids('exchange', name)}{{{{{_label(f'{name} ({kind})')}}}}}"


def _queue_node(spec: QueueSpec, ids: _NodeIds) -> str:
    node = ids("queue", spec.name)
    if spec.role == "retry":
        return f"    {node}([{_label(spec.name)}])"
    if spec.role == "dlq":
        return f"    {node}[({_label(spec.name)})]"
    return f"    {node}[{_label(spec.name)}]"


def _binding_edge(spec: BindingSpec, ids: _NodeIds) -> str:
    source = ids("exchange", spec.source)
    target = ids(spec.destination_type, spec.destination)
    key = ", ".join(f"{k}={v}" for k, v in spec.arguments.items()) or spec.routing_key
    return f"    {source} -->|{_label(key)}| {target}" if key else f"    {source} --> {target}"


def _failure_edges(declarations: Declarations, ids: _NodeIds) -> Iterator[str]:
    for spec in declarations.queues:
        owner = ids("queue", spec.owner)
        node = ids("queue", spec.name)
        if spec.role == "retry":
            ttl = format_duration(int(spec.arguments["x-message-ttl"]))
            yield f"    {owner} -.->|{_label('retry')}| {node}"
            # The tier dead-letters expired messages through the default exchange back
            # to the work queue only.
            yield f"    {node} -.->|{_label(f'TTL {ttl}')}| {owner}"
        elif spec.role == "work":
            dlx = declarations.routes[spec.name].dead_letter_exchange
            if dlx is not None:
                yield f"    {node} -.->|{_label('dead-letter')}| {ids('exchange', dlx)}"
