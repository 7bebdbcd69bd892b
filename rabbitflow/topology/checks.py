"""Semantic checks of a topology, run before anything touches a broker."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any

from rabbitflow.errors import Problem
from rabbitflow.topology.derived import derive
from rabbitflow.topology.model import Topology
from rabbitflow.topology.schema import BindingTable, QueueTable, TopologyFile

MAX_NAME_BYTES = 255
MAX_TTL_MS = 2**32 - 1  # x-message-ttl is an unsigned 32-bit count of milliseconds
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# Exchanges every RabbitMQ vhost has; they may be bound to but never declared.
BUILTIN_EXCHANGES = frozenset(
    {"amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match", "amq.rabbitmq.trace"}
)
_SHARED_ARGS = {
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-expires",
    "x-message-ttl",
    "x-single-active-consumer",
}
QUEUE_ARGUMENTS: dict[str, frozenset[str]] = {
    "classic": frozenset(
        _SHARED_ARGS
        | {"x-max-priority", "x-queue-mode", "x-queue-version", "x-queue-master-locator"}
    ),
    "quorum": frozenset(
        _SHARED_ARGS
        | {
            "x-quorum-initial-group-size",
            "x-max-in-memory-length",
            "x-max-in-memory-bytes",
            "x-dead-letter-strategy",
            "x-queue-leader-locator",
        }
    ),
    "stream": frozenset(
        {
            "x-max-length-bytes",
            "x-max-age",
            "x-stream-max-segment-size-bytes",
            "x-initial-cluster-size",
            "x-queue-leader-locator",
        }
    ),
}
MANAGED_ARGUMENTS = {
    "x-queue-type": "set queue_type instead",
    "x-dead-letter-exchange": (
        "rabbitflow sets it from [dead_letter]; use dead_letter = false to opt out"
    ),
    "x-dead-letter-routing-key": "rabbitflow routes dead letters to the queue's DLQ",
    "x-delivery-limit": "set crash_limit instead",
}
_OVERFLOW = {
    "classic": {"drop-head", "reject-publish", "reject-publish-dlx"},
    "quorum": {"drop-head", "reject-publish"},
}
_X_MATCH = {"all", "any", "all-with-x", "any-with-x"}


def check(parsed: TopologyFile, topology: Topology) -> list[Problem]:
    """Every semantic problem of a schema-valid file."""
    return [
        *_check_names(parsed, topology),
        *_check_exchanges(parsed),
        *_check_queues(parsed, topology),
    ]


def _q(name: str) -> str:
    # Same quoting as loader.format_path: TOML bare keys are ASCII letters, digits, _ and -.
    return name if _BARE_KEY.match(name) else '"' + name.replace('"', '\\"') + '"'


def _check_names(parsed: TopologyFile, topology: Topology) -> Iterator[Problem]:
    for kind, names in (("exchanges", parsed.exchanges), ("queues", parsed.queues)):
        for name in names:
            path = f"{kind}.{_q(name)}"
            if not name:
                yield Problem(path, "empty name", "give the object a name")
            if name.startswith("amq."):
                yield Problem(
                    path,
                    "names starting with 'amq.' are reserved by RabbitMQ",
                    "choose another prefix",
                )
            if len(name.encode()) > MAX_NAME_BYTES:
                yield Problem(
                    path,
                    f"name is {len(name.encode())} bytes; RabbitMQ allows at most {MAX_NAME_BYTES}",
                )
    dlx = parsed.dead_letter.exchange
    if dlx in parsed.exchanges:
        yield Problem(
            f"exchanges.{_q(dlx)}",
            "collides with the dead-letter exchange rabbitflow declares",
            "rename it, or set [dead_letter] exchange to another name",
        )
    if dlx.startswith("amq."):
        yield Problem("dead_letter.exchange", "names starting with 'amq.' are reserved by RabbitMQ")
    yield from _check_generated(parsed, topology)


def _check_generated(parsed: TopologyFile, topology: Topology) -> Iterator[Problem]:
    declarations = derive(topology)
    generated = {q.name: q.owner for q in declarations.queues if q.role != "work"}
    for name in parsed.queues:
        if name in generated:
            yield Problem(
                f"queues.{_q(name)}",
                f"collides with a queue rabbitflow generates for queue {generated[name]!r}",
                "rename one of them",
            )
    for spec in declarations.queues:
        size = len(spec.name.encode())
        if spec.role != "work" and size > MAX_NAME_BYTES:
            yield Problem(
                f"queues.{_q(spec.owner)}",
                f"generated queue name {spec.name!r} is "
                f"{size} bytes; RabbitMQ allows at most {MAX_NAME_BYTES}",
                "shorten the queue name",
            )


def _check_exchanges(parsed: TopologyFile) -> Iterator[Problem]:
    for name, exchange in parsed.exchanges.items():
        base = f"exchanges.{_q(name)}"
        for index, binding in enumerate(exchange.bindings):
            path = f"{base}.bindings[{index}]"
            if binding.exchange == name:
                yield Problem(path, "an exchange cannot be bound to itself")
            yield from _check_binding(parsed, binding, path)


def _check_binding(parsed: TopologyFile, binding: BindingTable, path: str) -> Iterator[Problem]:
    source = parsed.exchanges.get(binding.exchange)
    if binding.exchange == "":
        yield Problem(
            f"{path}.exchange",
            "the default exchange cannot be bound to",
            "every queue already receives messages published to it with its own name",
        )
        return
    if source is None and binding.exchange not in BUILTIN_EXCHANGES:
        known = [*parsed.exchanges, *sorted(BUILTIN_EXCHANGES)]
        close = difflib.get_close_matches(binding.exchange, known, n=1)
        hint = f'did you mean "{close[0]}"?' if close else "declare it under [exchanges]"
        yield Problem(f"{path}.exchange", f"exchange {binding.exchange!r} is not declared", hint)
        return
    kind = source.type if source else binding.exchange.removeprefix("amq.")
    if kind in ("headers", "match"):
        if binding.routing_key:
            yield Problem(
                f"{path}.routing_key",
                "headers exchanges ignore routing keys",
                'match on headers with arguments = { "x-match" = "all", ... }',
            )
        x_match = binding.arguments.get("x-match", "all")
        if not isinstance(x_match, str) or x_match not in _X_MATCH:
            yield Problem(
                f'{path}.arguments."x-match"',
                f"{x_match!r} is not a match mode",
                "use one of: " + ", ".join(sorted(_X_MATCH)),
            )
    elif binding.arguments and kind != "headers":
        yield Problem(
            f"{path}.arguments",
            f"only headers exchanges use binding arguments; "
            f"{binding.exchange!r} is a {kind} exchange",
        )


def _check_queues(parsed: TopologyFile, topology: Topology) -> Iterator[Problem]:
    if parsed.defaults.retry is not None:
        yield from _check_delays(parsed.defaults.retry.delays, "defaults.retry")
    yield from _check_timeout(parsed.defaults.timeout, "defaults.timeout")
    for name, table in parsed.queues.items():
        config = topology.queues[name]
        base = f"queues.{_q(name)}"
        yield from _check_timeout(table.timeout, f"{base}.timeout")
        for index, binding in enumerate(table.bindings):
            yield from _check_binding(parsed, binding, f"{base}.bindings[{index}]")
        if table.retry is not None and table.retry.enabled:
            yield from _check_delays(table.retry.delays, f"{base}.retry")
        if config.queue_type != "classic":
            for flag in ("exclusive", "auto_delete"):
                if getattr(table, flag):
                    yield Problem(
                        f"{base}.{flag}",
                        f"{config.queue_type} queues cannot be {flag.replace('_', '-')}",
                        'use queue_type = "classic"',
                    )
            if not table.durable:
                yield Problem(
                    f"{base}.durable",
                    f"{config.queue_type} queues are always durable",
                    'remove durable = false or use queue_type = "classic"',
                )
        if config.queue_type == "classic":
            yield from _check_classic(table, base)
        if config.dead_letter and any(c in name for c in "*#"):
            yield Problem(
                base,
                "'*' and '#' in a queue name would act as wildcards in its dead-letter binding",
                "rename the queue",
            )
        if config.concurrency and config.concurrency > config.prefetch:
            yield Problem(
                f"{base}.concurrency",
                f"concurrency {config.concurrency} exceeds "
                f"prefetch {config.prefetch}; at most prefetch messages are ever in hand",
                "lower concurrency or raise prefetch",
            )
        yield from _check_arguments(table, config.queue_type, base)


def _check_classic(table: QueueTable, base: str) -> Iterator[Problem]:
    if not table.durable and not table.exclusive:
        # Deprecated in RabbitMQ 4.0 (transient_nonexcl_queues, logged), refused from 4.3.
        yield Problem(
            f"{base}.durable",
            "a transient queue that is not exclusive is refused by RabbitMQ 4.3 and later",
            "remove durable = false, or set exclusive = true for a per-connection queue",
        )
    for key in ("leader_locator", "initial_group_size"):
        if getattr(table, key) is not None:
            yield Problem(
                f"{base}.{key}",
                "placement applies to quorum and stream queues, which are replicated; "
                "a classic queue lives on the node that declared it",
                f'remove {key} or use queue_type = "quorum"',
            )


def _check_timeout(timeout: int | None, path: str) -> Iterator[Problem]:
    if timeout is not None and timeout <= 0:
        yield Problem(path, "a handler timeout must be positive", "remove it for no time limit")


def _check_delays(delays: list[int], path: str) -> Iterator[Problem]:
    for index, delay in enumerate(delays):
        if delay <= 0:
            yield Problem(f"{path}.delays[{index}]", "delays must be positive")
        elif delay > MAX_TTL_MS:
            yield Problem(
                f"{path}.delays[{index}]",
                f"{delay} ms is over RabbitMQ's largest message TTL ({MAX_TTL_MS} ms, ~49.7 days)",
            )
        elif index and delay <= delays[index - 1]:
            yield Problem(
                f"{path}.delays[{index}]",
                "delays must be strictly increasing",
                "sort the delays; the last one repeats for further attempts",
            )


def _check_arguments(table: QueueTable, queue_type: str, base: str) -> Iterator[Problem]:
    valid = QUEUE_ARGUMENTS[queue_type]
    for key, value in table.arguments.items():
        path = f'{base}.arguments."{key}"'
        if key in MANAGED_ARGUMENTS:
            yield Problem(path, "managed by rabbitflow", MANAGED_ARGUMENTS[key])
        elif key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = (
                f'did you mean "{close[0]}"?' if close else "supported: " + ", ".join(sorted(valid))
            )
            yield Problem(path, f"not supported by {queue_type} queues", hint)
        else:
            yield from _check_argument_value(key, value, queue_type, path)


def _check_argument_value(key: str, value: Any, queue_type: str, path: str) -> Iterator[Problem]:
    if key == "x-overflow":
        allowed = _OVERFLOW.get(queue_type, set())
        if not isinstance(value, str) or value not in allowed:
            yield Problem(
                path,
                f"{value!r} is not an overflow mode of {queue_type} queues",
                "use one of: " + ", ".join(sorted(allowed)),
            )
    elif key in {
        "x-max-length",
        "x-max-length-bytes",
        "x-message-ttl",
        "x-expires",
        "x-max-priority",
        "x-max-in-memory-length",
        "x-max-in-memory-bytes",
    }:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            yield Problem(path, f"{value!r} must be a non-negative integer")
    elif key == "x-single-active-consumer" and not isinstance(value, bool):
        yield Problem(path, f"{value!r} must be true or false")
