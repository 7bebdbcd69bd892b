"""Semantic checks of a topology, run before anything touches a broker.

They run on every table that validated, in the same pass as the schema, so that a file's
errors all come out at once. A check names the keys it reads; it is skipped for a queue whose
value of one of them was refused (that value is a default standing in, not the user's).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rabbitflow._broker_version import OLDEST_SUPPORTED, BrokerVersion
from rabbitflow._duration import format_duration
from rabbitflow.errors import Problem
from rabbitflow.topology._derived import consumer_timeout_use, derive
from rabbitflow.topology._model import QueueConfig, Topology
from rabbitflow.topology._schema import (
    INHERITED,
    BindingTable,
    Loc,
    QueueTable,
    TopologyFile,
    a_kind,
    shown,
)
from rabbitflow.topology._wire import MAX_SHORTSTR_BYTES, name_problems, value_problems

MAX_NAME_BYTES = 255
MAX_PRIORITY = 255  # RabbitMQ refuses x-max-priority above 255
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
    "x-single-active-consumer": "set single_active_consumer = true instead",
    "x-consumer-timeout": 'set consumer_timeout = "45m" instead',
}
_OVERFLOW = {
    "classic": {"drop-head", "reject-publish", "reject-publish-dlx"},
    "quorum": {"drop-head", "reject-publish"},
}
_X_MATCH = {"all", "any", "all-with-x", "any-with-x"}


def check(
    parsed: TopologyFile, topology: Topology, refused: frozenset[Loc] = frozenset()
) -> list[Problem]:
    """Every semantic problem of the tables that validated, except those
    :func:`check_document` reports (the loader runs both). ``refused``: where the schema
    refused a value."""
    accepted = Accepted(parsed, refused)
    return [
        *_check_dead_letter(parsed, accepted),
        *_check_generated(parsed, topology, accepted),
        *_check_exchanges(parsed),
        *_check_queues(parsed, topology, accepted),
    ]


class Accepted:
    """Which values of the file are the user's own, accepted by the schema."""

    def __init__(self, parsed: TopologyFile, refused: frozenset[Loc]) -> None:
        self._parsed = parsed
        self._refused = refused
        # A refused value under a key (retry.delays[1]) taints the key (retry) too.
        self._under = {loc[:n] for loc in refused for n in range(1, len(loc) + 1)}

    def key(self, *loc: str | int) -> bool:
        """Whether the value at ``loc``, and everything in it, was accepted."""
        inside = any(loc[:n] in self._refused for n in range(1, len(loc)))
        return not inside and loc not in self._under

    def queue(self, name: str, keys: tuple[str, ...]) -> bool:
        """Whether every key of ``keys`` (``"retry.delays"`` for a key of a subtable) in queue
        ``name``, or in ``[defaults]`` when the queue inherits it, was accepted."""
        table = self._parsed.queues[name]
        for key in keys:
            path = tuple(key.split("."))
            if not self.key("queues", name, *path):
                return False
            inherits = path[0] in INHERITED and getattr(table, path[0]) is None
            if inherits and not self.key("defaults", *path):
                return False
        return True


def check_document(document: dict[str, Any]) -> list[Problem]:
    """Names, references between tables and argument values, checked on the raw TOML so that
    they are reported in the same run as schema errors. Values of the wrong type are left to
    the schema."""
    exchanges = _table(document.get("exchanges"))
    queues = _table(document.get("queues"))
    problems = [*_check_names(exchanges, "exchange"), *_check_names(queues, "queue")]
    dead_letter = _table(document.get("dead_letter")).get("exchange")
    if isinstance(dead_letter, str):
        problems += _name_problems(dead_letter, "exchange", "dead_letter.exchange")
    for kind, tables in (("exchanges", exchanges), ("queues", queues)):
        for name, table in tables.items():
            base = f"{kind}.{_q(name)}"
            table = _table(table)
            problems += _check_values(table.get("arguments"), f"{base}.arguments")
            bindings = table.get("bindings")
            for index, binding in enumerate(bindings if isinstance(bindings, list) else []):
                problems += _check_reference(
                    exchanges, _table(binding), f"{base}.bindings[{index}]"
                )
    return problems


def _table(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _q(name: str) -> str:
    # Same quoting as loader.format_path: TOML bare keys are ASCII letters, digits, _ and -.
    return name if _BARE_KEY.match(name) else '"' + name.replace('"', '\\"') + '"'


def _check_names(tables: dict[str, Any], kind: str) -> Iterator[Problem]:
    for name in tables:
        yield from _name_problems(name, kind, f"{kind}s.{_q(name)}")


def _name_problems(name: str, kind: str, path: str) -> Iterator[Problem]:
    if not name:
        yield Problem(path, "empty name", "give the object a name")
    if name.startswith("amq."):
        yield Problem(
            path, "names starting with 'amq.' are reserved by RabbitMQ", "choose another prefix"
        )
    for message, hint in name_problems(name, kind):
        yield Problem(path, message, hint)


def _check_values(arguments: object, path: str) -> Iterator[Problem]:
    if isinstance(arguments, dict):
        for relative, message in value_problems(arguments):
            yield Problem(f"{path}{relative}", message)


def _check_reference(
    exchanges: dict[str, Any], binding: dict[str, Any], path: str
) -> Iterator[Problem]:
    yield from _check_values(binding.get("arguments"), f"{path}.arguments")
    key = binding.get("routing_key")
    if isinstance(key, str) and len(key.encode()) > MAX_SHORTSTR_BYTES:
        yield Problem(
            f"{path}.routing_key",
            f"routing key is {len(key.encode())} bytes; at most {MAX_SHORTSTR_BYTES}",
        )
    exchange = binding.get("exchange")
    if not isinstance(exchange, str):
        return
    if exchange == "":
        yield Problem(
            f"{path}.exchange",
            "the default exchange cannot be bound to",
            "every queue already receives messages published to it with its own name",
        )
    elif exchange not in exchanges and exchange not in BUILTIN_EXCHANGES:
        known = [*exchanges, *sorted(BUILTIN_EXCHANGES)]
        close = difflib.get_close_matches(exchange, known, n=1)
        hint = f'did you mean "{close[0]}"?' if close else "declare it under [exchanges]"
        yield Problem(f"{path}.exchange", f"exchange {exchange!r} is not declared", hint)


def _check_dead_letter(parsed: TopologyFile, accepted: Accepted) -> Iterator[Problem]:
    dlx = parsed.dead_letter.exchange
    if dlx in parsed.exchanges and accepted.key("dead_letter", "exchange"):
        yield Problem(
            f"exchanges.{_q(dlx)}",
            "collides with the dead-letter exchange rabbitflow declares",
            "rename it, or set [dead_letter] exchange to another name",
        )


# The keys of a queue that decide the names of the queues generated for it, by role.
_GENERATING = {"retry": ("queue_type", "retry"), "dlq": ("dead_letter",)}


def _check_generated(
    parsed: TopologyFile, topology: Topology, accepted: Accepted
) -> Iterator[Problem]:
    declarations = derive(topology)
    generated = {
        q.name: q.owner
        for q in declarations.queues
        if q.role != "work" and accepted.queue(q.owner, _GENERATING[q.role])
    }
    for name in parsed.queues:
        if name in generated:
            yield Problem(
                f"queues.{_q(name)}",
                f"collides with a queue rabbitflow generates for queue {generated[name]!r}",
                "rename one of them",
            )
    for spec in declarations.queues:
        size = len(spec.name.encode())
        if (
            spec.role != "work"
            and size > MAX_NAME_BYTES
            and len(spec.owner.encode()) <= MAX_NAME_BYTES
        ):
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
    # An empty or undeclared source is reported by check_document.
    source = parsed.exchanges.get(binding.exchange)
    if source is None and binding.exchange not in BUILTIN_EXCHANGES:
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


QueueCheck = Callable[[QueueTable, QueueConfig, str], Iterator[Problem]]


def _check_queues(
    parsed: TopologyFile, topology: Topology, accepted: Accepted
) -> Iterator[Problem]:
    if parsed.defaults.retry is not None:
        yield from _check_delays(parsed.defaults.retry.delays, "defaults.retry")
    yield from _check_timeout(parsed.defaults.timeout, "defaults.timeout")
    for name, table in parsed.queues.items():
        config = topology.queues[name]
        base = f"queues.{_q(name)}"
        for index, binding in enumerate(table.bindings):
            yield from _check_binding(parsed, binding, f"{base}.bindings[{index}]")
        for keys, queue_check in QUEUE_CHECKS:
            if accepted.queue(name, keys):
                yield from queue_check(table, config, base)


def _check_own_timeout(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    yield from _check_timeout(table.timeout, f"{base}.timeout")


def _check_own_delays(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if table.retry is not None and table.retry.enabled:
        yield from _check_delays(table.retry.delays, f"{base}.retry")


def _check_replicated(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if config.queue_type == "classic":
        return
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


def _check_wildcards(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if config.dead_letter and any(c in config.name for c in "*#"):
        yield Problem(
            base,
            "'*' and '#' in a queue name would act as wildcards in its dead-letter binding",
            "rename the queue",
        )


def _check_concurrency(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if config.concurrency and config.concurrency > config.prefetch:
        yield Problem(
            f"{base}.concurrency",
            f"concurrency {config.concurrency} exceeds "
            f"prefetch {config.prefetch}; at most prefetch messages are ever in hand",
            "lower concurrency or raise prefetch",
        )


def _check_stream_breaker(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if config.queue_type == "stream" and config.circuit_breaker is not None:
        yield Problem(
            f"{base}.circuit_breaker",
            "the circuit breaker is not supported on streams",
            "remove it (a paused stream consumer would resume without its offset)",
        )


def _check_stream_offset(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if table.stream_offset is not None and config.queue_type != "stream":
        yield Problem(
            f"{base}.stream_offset",
            f"only stream queues have offsets; this is a {config.queue_type} queue",
            'remove it, or use queue_type = "stream"',
        )


def _check_single_active(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if table.single_active_consumer and config.queue_type == "stream":
        # RabbitMQ refuses the argument on a stream (PRECONDITION_FAILED); streams have their
        # own single active consumer, for named consumers of the stream protocol only.
        yield Problem(
            f"{base}.single_active_consumer",
            "stream queues do not support single_active_consumer over AMQP",
            'use queue_type = "quorum" or "classic"',
        )


def _check_consumer_timeout(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    limit = config.consumer_timeout_ms
    if limit is None:
        return
    own = table.consumer_timeout is not None
    path = f"{base}.consumer_timeout" if own else "defaults.consumer_timeout"
    if limit <= 0:
        yield Problem(path, "consumer_timeout must be positive")
        return
    timeout = config.timeout_ms
    label = format_duration(limit)
    # Past consumer_timeout the broker closes the whole channel: every delivery in hand on it
    # goes back to the queue, the finished ones included. The handler must stop first.
    if timeout is None:
        yield Problem(
            f"{base}.timeout",
            f"no handler timeout, but consumer_timeout is {label}: a handler running longer "
            "gets its channel closed by the broker",
            f"set timeout below {label}",
        )
    elif timeout >= limit:
        yield Problem(
            f"{base}.timeout",
            f"handler timeout {format_duration(timeout)} is not below consumer_timeout {label}",
            f"set timeout below {label}, or raise consumer_timeout",
        )


def _check_classic(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    if config.queue_type != "classic":
        return
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


def _check_delays(delays: Sequence[int], path: str) -> Iterator[Problem]:
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


def _check_arguments(table: QueueTable, config: QueueConfig, base: str) -> Iterator[Problem]:
    queue_type = config.queue_type
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


# RabbitMQ checks the AMQP type of the arguments it knows and refuses the declaration
# (PRECONDITION_FAILED, "invalid arg ... of type longstr") when a number comes as a string.
INTEGER_ARGUMENTS = frozenset(
    {
        "x-max-length",
        "x-max-length-bytes",
        "x-message-ttl",
        "x-expires",
        "x-max-priority",
        "x-max-in-memory-length",
        "x-max-in-memory-bytes",
        "x-queue-version",
        "x-quorum-initial-group-size",
        "x-stream-max-segment-size-bytes",
        "x-initial-cluster-size",
    }
)
STRING_ARGUMENTS = frozenset(
    {
        "x-overflow",
        "x-queue-mode",
        "x-max-age",
        "x-dead-letter-strategy",
        "x-queue-leader-locator",
        "x-queue-master-locator",
    }
)


def _check_argument_value(key: str, value: Any, queue_type: str, path: str) -> Iterator[Problem]:
    if any(value_problems(value)):
        return  # cannot be sent at all: check_document says why
    if key == "x-overflow":
        allowed = _OVERFLOW.get(queue_type, set())
        if not isinstance(value, str) or value not in allowed:
            yield Problem(
                path,
                f"{shown(value)} is not an overflow mode of {queue_type} queues",
                "use one of: " + ", ".join(sorted(allowed)),
            )
    elif key in INTEGER_ARGUMENTS:
        yield from _check_integer_argument(key, value, path)
    elif key in STRING_ARGUMENTS and not isinstance(value, str):
        yield Problem(path, f"{shown(value)} is {a_kind(value)}, not a string")


def _check_integer_argument(key: str, value: Any, path: str) -> Iterator[Problem]:
    if isinstance(value, bool) or not isinstance(value, int):
        fix = _int_fix(key, value)
        yield Problem(path, f"{shown(value)} is {a_kind(value)}, not an integer", fix)
    elif value < 0:
        yield Problem(path, f"{value} must be a non-negative integer")
    elif key == "x-max-priority" and value > MAX_PRIORITY:
        yield Problem(path, f"{value} is over RabbitMQ's highest priority, {MAX_PRIORITY}")
    elif key in ("x-message-ttl", "x-expires") and value > MAX_TTL_MS:
        yield Problem(path, f"{value} ms is over RabbitMQ's limit of {MAX_TTL_MS} ms")
    elif key == "x-expires" and value == 0:
        yield Problem(
            path, "x-expires must be positive", "remove it for a queue that never expires"
        )


def _int_fix(key: str, value: Any) -> str:
    if isinstance(value, str) and value.strip().isdigit():
        return f'write "{key}" = {int(value)}, without quotes'
    if isinstance(value, float) and value.is_integer():
        return f'write "{key}" = {int(value)}'
    return ""


# (the keys of a queue a check reads, the check): run on every queue whose values of these
# keys, its own or inherited from [defaults], were accepted.
QUEUE_CHECKS: list[tuple[tuple[str, ...], QueueCheck]] = [
    (("timeout",), _check_own_timeout),
    (("retry.delays",), _check_own_delays),
    (("queue_type", "exclusive", "auto_delete", "durable"), _check_replicated),
    (("dead_letter",), _check_wildcards),
    (("concurrency", "prefetch"), _check_concurrency),
    (("queue_type", "single_active_consumer"), _check_single_active),
    (("queue_type", "circuit_breaker"), _check_stream_breaker),
    (("queue_type", "stream_offset"), _check_stream_offset),
    (("timeout", "consumer_timeout"), _check_consumer_timeout),
    (
        ("queue_type", "durable", "exclusive", "leader_locator", "initial_group_size"),
        _check_classic,
    ),
    (("queue_type", "arguments"), _check_arguments),
]


# Queue arguments a release refuses although earlier ones accept them: (argument, queue type)
# -> (first refusing version, why, what to do).
_REFUSED_FROM: dict[tuple[str, str], tuple[tuple[int, int], str, str]] = {
    ("x-queue-master-locator", "classic"): (
        (4, 3),
        "refused by RabbitMQ 4.3 and later (the deprecated feature queue_master_locator is "
        "not permitted by default; the broker closes the connection)",
        "remove it: classic queues are not mirrored since 4.0, so there is no master to place",
    ),
}


def check_for_broker(topology: Topology, version: BrokerVersion) -> tuple[list[Problem], list[str]]:
    """What a topology that passed :func:`check` meets on one RabbitMQ ``version``.

    Returns the problems (objects that version refuses) and notes (settings that take effect
    differently there, such as ``consumer_timeout``)."""
    problems: list[Problem] = []
    if not version.supported:
        oldest = ".".join(map(str, OLDEST_SUPPORTED))
        problems.append(
            Problem("", f"RabbitMQ {version} is not supported", f"use {oldest} or later")
        )
    for config in topology.queues.values():
        base = f"queues.{_q(config.name)}"
        for key in config.arguments:
            refused = _REFUSED_FROM.get((key, config.queue_type))
            if refused is not None and version.at_least(*refused[0]):
                problems.append(Problem(f'{base}.arguments."{key}"', refused[1], refused[2]))
    notes = [
        f"queues.{_q(spec.name)}: {use}"
        for spec in derive(topology).queues
        if (use := consumer_timeout_use(spec, version)) is not None
    ]
    return problems, notes
