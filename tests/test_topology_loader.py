"""topology.toml: what loads, and the exact error a user sees for what does not."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbitflow._duration import format_duration, parse_duration
from rabbitflow.errors import Problem, TopologyError, TopologySyntaxError
from rabbitflow.topology import Topology, derive, load_topology, parse_topology, tier_name

ROOT = Path(__file__).resolve().parent.parent
LONG_NAME = "a" * 256

GOOD: list[tuple[str, str, Callable[[Topology], Any]]] = [
    (
        "defaults apply",
        "[queues.a]\n",
        lambda t: (
            t.queues["a"].queue_type == "quorum"
            and t.queues["a"].prefetch == 32
            and t.queues["a"].retry.delays_ms == (1_000, 10_000, 60_000)
            and t.queues["a"].retry.max_attempts == 4
            and t.queues["a"].crash_limit == 10
        ),
    ),
    (
        "durations in every form",
        '[queues.a]\ntimeout = 1500\nretry = { delays = ["250ms", "5s", "1m", "2h", "7d"] }\n',
        lambda t: (
            t.queues["a"].timeout_ms == 1500
            and t.queues["a"].retry.delays_ms == (250, 5_000, 60_000, 7_200_000, 604_800_000)
            and tier_name("a", 604_800_000) == "a.retry.7d"
        ),
    ),
    (
        "retry = false",
        "[queues.a]\nretry = false\n",
        lambda t: (
            not t.queues["a"].retry.enabled
            and [q.role for q in derive(t).queues] == ["work", "dlq"]
        ),
    ),
    (
        "dead_letter = false",
        "[defaults]\ndead_letter = false\nretry = false\n[queues.a]\n",
        lambda t: [q.name for q in derive(t).queues] == ["a"] and not derive(t).exchanges,
    ),
    (
        "headers binding",
        '[exchanges.h]\ntype = "headers"\n'
        '[queues.a]\nbindings = [{ exchange = "h", arguments = { "x-match" = "any", k = "v" } }]\n',
        lambda t: t.queues["a"].bindings[0].arguments == {"x-match": "any", "k": "v"},
    ),
    (
        "binding to a built-in exchange",
        '[queues.a]\nbindings = [{ exchange = "amq.topic", routing_key = "a.*" }]\n',
        lambda t: t.queues["a"].bindings[0].exchange == "amq.topic",
    ),
    (
        "exclusive classic queue",
        '[queues.a]\nqueue_type = "classic"\nexclusive = true\nauto_delete = true\n',
        lambda t: t.queues["a"].exclusive and t.queues["a"].auto_delete,
    ),
    (
        "stream arguments",
        '[queues.s]\nqueue_type = "stream"\narguments = { "x-max-age" = "7D" }\n',
        lambda t: t.queues["s"].arguments == {"x-max-age": "7D"},
    ),
    (
        "256-byte name is the limit, 255 is fine",
        "[defaults]\nretry = false\ndead_letter = false\n[queues." + "a" * 255 + "]\n",
        lambda t: len(t.queues) == 1,
    ),
]


@pytest.mark.parametrize(("toml", "check"), [(g[1], g[2]) for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_files_load(toml: str, check: Callable[[Topology], Any]) -> None:
    assert check(parse_topology(toml, "t.toml"))


def test_the_example_topology_loads() -> None:
    topology = load_topology(ROOT / "topology.toml")
    assert sorted(topology.queues) == [
        "audit.all",
        "billing.order-created",
        "shipping.order-paid",
        "support.vip-orders",
    ]
    assert topology.queues["billing.order-created"].retry.max_attempts == 5


# (id, file, the problem line exactly as printed, indented under the file name)
BAD: list[tuple[str, str, str]] = [
    (
        "unknown key",
        "[queues.a]\nprefetchh = 3\n",
        'queues.a.prefetchh: unknown key (did you mean "prefetch"?)',
    ),
    (
        "unknown table",
        "[queue.a]\n",
        'queue: unknown key (did you mean "queues"?)',
    ),
    (
        "bad duration",
        '[queues."billing.order-created"]\nretry = { delays = ["5s", "5 parsecs"] }\n',
        "queues.\"billing.order-created\".retry.delays[1]: '5 parsecs' is not a duration; "
        'write a number with a unit ("250ms", "5s", "1m", "2h", "7d") or an integer of '
        "milliseconds",
    ),
    (
        "fractional milliseconds",
        '[queues.a]\ntimeout = "1.5ms"\n',
        "queues.a.timeout: '1.5ms' is not a whole number of milliseconds",
    ),
    (
        "unsorted delays",
        '[queues.a]\nretry = { delays = ["5s", "1s"] }\n',
        "queues.a.retry.delays[1]: delays must be strictly increasing "
        "(sort the delays; the last one repeats for further attempts)",
    ),
    (
        "equal delays",
        '[defaults]\nretry = { delays = ["5s", "5s"] }\n',
        "defaults.retry.delays[1]: delays must be strictly increasing "
        "(sort the delays; the last one repeats for further attempts)",
    ),
    (
        "zero delay",
        '[queues.a]\nretry = { delays = [0, "1s"] }\n',
        "queues.a.retry.delays[0]: delays must be positive",
    ),
    (
        "delay over the broker's largest TTL",
        '[queues.a]\nretry = { delays = ["1s", "1200h"] }\n',
        "queues.a.retry.delays[1]: 4320000000 ms is over RabbitMQ's largest message TTL "
        "(4294967295 ms, ~49.7 days)",
    ),
    (
        "zero timeout",
        '[queues.a]\ntimeout = "0s"\n',
        "queues.a.timeout: a handler timeout must be positive (remove it for no time limit)",
    ),
    (
        "amq. queue",
        '[queues."amq.jobs"]\n',
        "queues.\"amq.jobs\": names starting with 'amq.' are reserved by RabbitMQ "
        "(choose another prefix)",
    ),
    (
        "amq. exchange",
        '[exchanges."amq.orders"]\ntype = "topic"\n',
        "exchanges.\"amq.orders\": names starting with 'amq.' are reserved by RabbitMQ "
        "(choose another prefix)",
    ),
    (
        "256-byte name",
        f'[defaults]\nretry = false\ndead_letter = false\n[queues."{LONG_NAME}"]\n',
        f"queues.{LONG_NAME}: name is 256 bytes; RabbitMQ allows at most 255",
    ),
    (
        "non-ASCII queue name",
        '[queues."café.日本"]\n',
        "queues.\"café.日本\": 'é', '日', '本' cannot be used in queue names: the AMQP client "
        "refuses them (use ASCII letters, digits, space and - _ . : @ # , / +)",
    ),
    (
        "exchange name with a character the client refuses",
        '[exchanges."orders!"]\ntype = "topic"\n',
        "exchanges.\"orders!\": '!' cannot be used in exchange names",
    ),
    (
        "binding to an exchange named with a refused character",
        '[queues.a]\nbindings = [{ exchange = "ex*" }]\n',
        "queues.a.bindings[0].exchange: exchange 'ex*' is not declared",
    ),
    (
        "dead-letter exchange name",
        '[dead_letter]\nexchange = "dead letters é"\n',
        "dead_letter.exchange: 'é' cannot be used in exchange names",
    ),
    (
        "128-character exchange name",
        "[exchanges." + "x" * 128 + ']\ntype = "topic"\n',
        f"exchanges.{'x' * 128}: name is 128 characters; the AMQP client allows at most 127",
    ),
    (
        "256-byte routing key",
        '[exchanges.e]\ntype = "topic"\n[queues.a]\nbindings = [{ exchange = "e", routing_key = "'
        + "k" * 256
        + '" }]\n',
        "queues.a.bindings[0].routing_key: routing key is 256 bytes; at most 255",
    ),
    (
        "a TOML date as an argument",
        '[exchanges.e]\ntype = "topic"\narguments = { since = 2024-01-01 }\n',
        'exchanges.e.arguments."since": a TOML date cannot be sent; use a full date-time or a '
        "string",
    ),
    (
        "a TOML time in a headers binding",
        '[exchanges.h]\ntype = "headers"\n'
        '[queues.a]\nbindings = [{ exchange = "h", arguments = { at = [1, 07:30:00] } }]\n',
        'queues.a.bindings[0].arguments."at"[1]: a TOML time cannot be sent',
    ),
    (
        "x-max-priority over 255",
        '[queues.a]\nqueue_type = "classic"\narguments = { "x-max-priority" = 256 }\n',
        'queues.a.arguments."x-max-priority": 256 is over RabbitMQ\'s highest priority, 255',
    ),
    (
        "generated name too long",
        "[queues." + "a" * 252 + "]\nretry = false\n",
        f"queues.{'a' * 252}: generated queue name '{'a' * 252}.dlq' is 256 bytes; "
        "RabbitMQ allows at most 255 (shorten the queue name)",
    ),
    (
        "binding to an undeclared exchange",
        '[exchanges.orders]\ntype = "topic"\n'
        '[queues.a]\nbindings = [{ exchange = "order", routing_key = "x" }]\n',
        "queues.a.bindings[0].exchange: exchange 'order' is not declared "
        '(did you mean "orders"?)',
    ),
    (
        "quorum and exclusive",
        "[queues.a]\nexclusive = true\n",
        'queues.a.exclusive: quorum queues cannot be exclusive (use queue_type = "classic")',
    ),
    (
        "quorum and auto_delete",
        "[queues.a]\nauto_delete = true\n",
        'queues.a.auto_delete: quorum queues cannot be auto-delete (use queue_type = "classic")',
    ),
    (
        "argument the queue type does not support",
        '[queues.a]\narguments = { "x-max-priority" = 10 }\n',
        'queues.a.arguments."x-max-priority": not supported by quorum queues',
    ),
    (
        "misspelt argument",
        '[queues.a]\nqueue_type = "classic"\narguments = { "x-max-lenght" = 10 }\n',
        'queues.a.arguments."x-max-lenght": not supported by classic queues '
        '(did you mean "x-max-length"?)',
    ),
    (
        "managed argument",
        '[queues.a]\narguments = { "x-delivery-limit" = 10 }\n',
        'queues.a.arguments."x-delivery-limit": managed by rabbitflow (set crash_limit instead)',
    ),
    (
        "collision with a generated DLQ",
        '[queues.a]\n[queues."a.dlq"]\n',
        "queues.\"a.dlq\": collides with a queue rabbitflow generates for queue 'a' "
        "(rename one of them)",
    ),
    (
        "collision with a generated retry tier",
        '[queues.a]\n[queues."a.retry.10s"]\n',
        "queues.\"a.retry.10s\": collides with a queue rabbitflow generates for queue 'a' "
        "(rename one of them)",
    ),
    (
        "overflow mode of the wrong type",
        '[queues.a]\narguments = { "x-overflow" = ["drop-head"] }\n',
        "queues.a.arguments.\"x-overflow\": ['drop-head'] is not an overflow mode of quorum "
        "queues (use one of: drop-head, reject-publish)",
    ),
    (
        "headers match mode",
        '[exchanges.h]\ntype = "headers"\n'
        '[queues.a]\nbindings = [{ exchange = "h", arguments = { "x-match" = "some" } }]\n',
        "queues.a.bindings[0].arguments.\"x-match\": 'some' is not a match mode "
        "(use one of: all, all-with-x, any, any-with-x)",
    ),
    (
        "headers match mode of the wrong type",
        '[exchanges.h]\ntype = "headers"\n'
        '[queues.a]\nbindings = [{ exchange = "h", arguments = { "x-match" = ["all"] } }]\n',
        "queues.a.bindings[0].arguments.\"x-match\": ['all'] is not a match mode",
    ),
    (
        "prefetch 0",
        "[queues.a]\nprefetch = 0\n",
        "queues.a.prefetch: prefetch 0 means unlimited, which lets the broker push the whole "
        "queue into memory; set a positive prefetch (e.g. 32)",
    ),
    (
        "exchange type",
        '[exchanges.x]\ntype = "topik"\n',
        "exchanges.x.type: 'topik' is not allowed; expected 'direct', 'topic', 'fanout' or "
        "'headers'",
    ),
    (
        "missing exchange type",
        "[exchanges.x]\n",
        "exchanges.x.type: required key is missing",
    ),
    (
        "retry = true",
        "[queues.a]\nretry = true\n",
        'queues.a.retry: retry = true is not a policy; write retry = { delays = ["1s", "10s"] }',
    ),
]


@pytest.mark.parametrize(("toml", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_files_name_the_path_and_the_fix(toml: str, expected: str) -> None:
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    lines = str(raised.value).splitlines()
    assert lines[0].startswith("topology.toml: ")
    assert f"  {expected}" in lines[1:] or any(
        line.startswith(f"  {expected}") for line in lines[1:]
    ), str(raised.value)


# --- strict types: a string is never a boolean or a number, a float never an integer -------

STRICT: list[tuple[str, str, str]] = [
    (
        "a quoted boolean",
        '[queues.a]\ndurable = "yes"\n',
        "queues.a.durable: 'yes' is a string, not true or false "
        "(write durable = true, without quotes)",
    ),
    (
        'dead_letter = "false" (was true: no error and 0 dead-letter queues)',
        '[defaults]\ndead_letter = "false"\n[queues.a]\n',
        "defaults.dead_letter: 'false' is a string, not true or false "
        "(write dead_letter = false, without quotes)",
    ),
    (
        "an integer for a boolean",
        '[exchanges.x]\ntype = "topic"\ndurable = 1\n',
        "exchanges.x.durable: 1 is an integer, not true or false (write durable = true)",
    ),
    (
        "0 for a boolean",
        "[queues.a]\nexclusive = 0\n",
        "queues.a.exclusive: 0 is an integer, not true or false (write exclusive = false)",
    ),
    (
        "a word that is no boolean",
        '[queues.a]\nidempotent = "maybe"\n',
        "queues.a.idempotent: 'maybe' is a string, not true or false "
        "(write idempotent = true or idempotent = false)",
    ),
    (
        "a quoted integer",
        '[queues.a]\nprefetch = "50"\n',
        "queues.a.prefetch: '50' is a string, not an integer (write prefetch = 50, without quotes)",
    ),
    (
        "a quoted integer in a retry policy",
        '[queues.a]\nretry = { delays = ["1s"], max_attempts = "4" }\n',
        "queues.a.retry.max_attempts: '4' is a string, not an integer "
        "(write max_attempts = 4, without quotes)",
    ),
    (
        "a float for an integer",
        "[queues.a]\nprefetch = 50.0\n",
        "queues.a.prefetch: 50.0 is a float, not an integer (write prefetch = 50)",
    ),
    (
        "a fractional float for an integer",
        "[defaults]\nconcurrency = 2.5\n",
        "defaults.concurrency: 2.5 is a float, not an integer (write a whole number)",
    ),
    (
        "a boolean for an integer",
        "[queues.a]\ncrash_limit = true\n",
        "queues.a.crash_limit: true is a boolean, not an integer",
    ),
    (
        "an integer below the minimum",
        "[defaults]\ncrash_limit = 0\n",
        "defaults.crash_limit: 0 is below the minimum, 1",
    ),
    (
        "an integer over the maximum",
        "[queues.a]\nimmediate_retries = 11\n",
        "queues.a.immediate_retries: 11 is over the maximum, 10",
    ),
    (
        "a prefetch over the AMQP limit",
        "[queues.a]\nprefetch = 65536\n",
        "queues.a.prefetch: 65536 is over the maximum, 65535",
    ),
    (
        "a quoted proportion",
        '[queues.a]\ncircuit_breaker = { failure_ratio = "0.5" }\n',
        "queues.a.circuit_breaker.failure_ratio: '0.5' is a string, not a number "
        "(write failure_ratio = 0.5, without quotes)",
    ),
    (
        "a proportion over 1",
        "[defaults]\ncircuit_breaker = { failure_ratio = 2 }\n",
        "defaults.circuit_breaker.failure_ratio: 2 is over the maximum, 1",
    ),
    (
        "a float for min_calls",
        "[queues.a]\ncircuit_breaker = { min_calls = 20.0 }\n",
        "queues.a.circuit_breaker.min_calls: 20.0 is a float, not an integer "
        "(write min_calls = 20)",
    ),
    (
        "a float duration",
        "[queues.a]\ntimeout = 1.5\n",
        "queues.a.timeout: 1.5 is not a duration; write a number with a unit",
    ),
    (
        "a boolean duration",
        "[defaults]\nconsumer_timeout = true\n",
        "defaults.consumer_timeout: true is not a duration",
    ),
    (
        "a float size",
        "[queues.a]\nmax_body_size = 1.5\n",
        'queues.a.max_body_size: 1.5 is a float; write bytes as an integer or e.g. "16MiB"',
    ),
    (
        'retry = "false"',
        '[queues.a]\nretry = "false"\n',
        "queues.a.retry: 'false' is a string (write retry = false, without quotes)",
    ),
    (
        "retry = []",
        "[queues.a]\nretry = { delays = [] }\n",
        "queues.a.retry.delays: no delays; write retry = false to turn retries off",
    ),
    (
        "a capitalised queue type",
        '[defaults]\nqueue_type = "Quorum"\n',
        "defaults.queue_type: 'Quorum' is not allowed; expected 'quorum', 'classic' or 'stream' "
        "(did you mean 'quorum'?)",
    ),
    (
        "a number for a choice",
        "[queues.a]\nleader_locator = 1\n",
        "queues.a.leader_locator: 1 is not allowed; expected 'client-local' or 'balanced'",
    ),
    (
        "a number for a string",
        "[dead_letter]\nexchange = 5\n",
        'dead_letter.exchange: 5 is an integer, not a string (write exchange = "5")',
    ),
    (
        "a number for a routing key",
        '[exchanges.e]\ntype = "topic"\n'
        '[queues.a]\nbindings = [{ exchange = "e", routing_key = 5 }]\n',
        'queues.a.bindings[0].routing_key: 5 is an integer, not a string (write routing_key = "5")',
    ),
    (
        "a binding without an exchange",
        '[queues.a]\nbindings = [{ routing_key = "x" }]\n',
        "queues.a.bindings[0].exchange: required key is missing",
    ),
    (
        "a binding that is not a table",
        '[queues.a]\nbindings = ["orders"]\n',
        "queues.a.bindings[0]: 'orders' is a string, not a table",
    ),
    (
        "bindings that are not an array",
        '[queues.a]\nbindings = { exchange = "orders" }\n',
        "queues.a.bindings: { exchange = 'orders' } is a table, not an array",
    ),
    (
        "a queue that is not a table",
        "[queues]\na = 5\n",
        "queues.a: 5 is an integer, not a table",
    ),
    (
        "arguments that are not a table",
        '[queues.a]\narguments = "x-max-length=5"\n',
        "queues.a.arguments: 'x-max-length=5' is a string, not a table",
    ),
    (
        "a string where a list of strings goes",
        '[queues.a]\nretry_on = "TimeoutError"\n',
        "queues.a.retry_on: 'TimeoutError' is a string, not an array",
    ),
    (
        "a number in a list of strings",
        '[queues.a]\ndead_letter_on = ["ValueError", 3]\n',
        "queues.a.dead_letter_on[1]: 3 is an integer, not a string",
    ),
    (
        "urls as one string",
        '[broker]\nurls = "amqp://localhost/"\n',
        "broker.urls: 'amqp://localhost/' is a string, not an array",
    ),
    (
        "no urls",
        "[broker]\nurls = []\n",
        'broker.urls: urls = [] names no node; write urls = ["amqp://host:5672/"]',
    ),
    (
        "url and urls",
        '[broker]\nurl = "amqp://a/"\nurls = ["amqp://b/"]\n',
        "broker: set url (one node) or urls (a cluster), not both",
    ),
    (
        "a stream offset that is no position",
        '[queues.s]\nqueue_type = "stream"\nstream_offset = "start"\n',
        "queues.s.stream_offset: 'start' is not a stream offset "
        '(write "first", "last", "next", an offset (an integer >= 0) or a date-time)',
    ),
    (
        "a negative stream offset",
        '[queues.s]\nqueue_type = "stream"\nstream_offset = -1\n',
        "queues.s.stream_offset: -1 is not a stream offset",
    ),
    (
        "a quoted integer argument",
        '[queues.a]\narguments = { "x-max-length" = "1000" }\n',
        "queues.a.arguments.\"x-max-length\": '1000' is a string, not an integer "
        '(write "x-max-length" = 1000, without quotes)',
    ),
    (
        "a float integer argument",
        '[queues.a]\nqueue_type = "classic"\narguments = { "x-message-ttl" = 60000.0 }\n',
        'queues.a.arguments."x-message-ttl": 60000.0 is a float, not an integer '
        '(write "x-message-ttl" = 60000)',
    ),
    (
        "a number for a string argument",
        '[queues.s]\nqueue_type = "stream"\narguments = { "x-max-age" = 7 }\n',
        'queues.s.arguments."x-max-age": 7 is an integer, not a string',
    ),
    (
        "a boolean for a string argument",
        '[queues.a]\narguments = { "x-dead-letter-strategy" = true }\n',
        'queues.a.arguments."x-dead-letter-strategy": true is a boolean, not a string',
    ),
]


@pytest.mark.parametrize(
    ("toml", "expected"), [case[1:] for case in STRICT], ids=[case[0] for case in STRICT]
)
def test_values_of_the_wrong_type_are_errors_with_the_fix(toml: str, expected: str) -> None:
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    lines = str(raised.value).splitlines()
    assert lines[0] == "topology.toml: 1 error", str(raised.value)
    assert lines[1].startswith(f"  {expected}"), str(raised.value)


LOOSE_BUT_RIGHT = [
    ("an integer proportion", "[defaults]\ncircuit_breaker = { failure_ratio = 1 }\n"),
    (
        "an integer of milliseconds",
        '[queues.a]\ntimeout = 1500\nretry = { delays = [1000, "1m"] }\n',
    ),
    ("an integer size", "[queues.a]\nmax_body_size = 1048576\n"),
    (
        "a stream offset as a date-time",
        '[queues.s]\nqueue_type = "stream"\nstream_offset = 2026-01-01T00:00:00Z\n',
    ),
    ("a stream offset as an offset", '[queues.s]\nqueue_type = "stream"\nstream_offset = 0\n'),
    # Arguments pass through to AMQP: any value it can carry, for arguments rabbitflow does
    # not know.
    (
        "an exchange's free-form arguments",
        '[exchanges.e]\ntype = "topic"\n'
        'arguments = { "x-custom" = [1, 2.5, true, "s", { k = "v" }], '
        'alternate-exchange = "ae" }\n',
    ),
    (
        "headers of every type",
        '[exchanges.h]\ntype = "headers"\n[queues.a]\nbindings = [{ exchange = "h", '
        'arguments = { "x-match" = "all", n = 1, f = 1.5, b = false } }]\n',
    ),
]


@pytest.mark.parametrize(
    "toml", [case[1] for case in LOOSE_BUT_RIGHT], ids=[case[0] for case in LOOSE_BUT_RIGHT]
)
def test_values_of_the_right_type_load(toml: str) -> None:
    assert not parse_topology(toml, "topology.toml").warnings


def test_dead_letter_false_unquoted_gives_no_dead_letter_queues() -> None:
    topology = parse_topology("[defaults]\ndead_letter = false\n[queues.a]\n")
    assert [spec.role for spec in derive(topology).queues] == ["work", "retry", "retry", "retry"]


# --- warnings: likely mistakes that are not errors -------------------------------------------

WARNED = [
    ("a timeout", "[queues.a]\ntimeout = 30\n", "queues.a.timeout", 30),
    ("a default timeout", "[defaults]\ntimeout = 999\n", "defaults.timeout", 999),
    ("a delay", '[queues.a]\nretry = { delays = [5, "10s"] }\n', "queues.a.retry.delays[0]", 5),
    (
        "max_defer",
        '[queues.a]\nretry = { delays = ["1s"], max_defer = 60 }\n',
        "queues.a.retry.max_defer",
        60,
    ),
    (
        "a consumer timeout",
        "[defaults]\nconsumer_timeout = 900\ntimeout = 100\n",
        "defaults.consumer_timeout",
        900,
    ),
    (
        "a breaker cooldown",
        "[queues.a]\ncircuit_breaker = { cooldown = 30 }\n",
        "queues.a.circuit_breaker.cooldown",
        30,
    ),
]


@pytest.mark.parametrize(
    ("toml", "path", "number"), [w[1:] for w in WARNED], ids=[w[0] for w in WARNED]
)
def test_a_bare_integer_under_a_second_is_a_warning(toml: str, path: str, number: int) -> None:
    topology = parse_topology(toml, "topology.toml")

    assert [w.path for w in topology.warnings if w.path == path] == [path]
    warning = next(w for w in topology.warnings if w.path == path)
    assert warning.message == f'{number} ms; did you mean "{number}s"?'
    assert f'"{number}ms" to keep {number} ms' in warning.hint


def test_durations_with_a_unit_or_of_a_second_and_more_are_not_warned_about() -> None:
    toml = (
        '[queues.a]\ntimeout = "30ms"\nretry = { delays = ["5ms", 1000] }\n'
        "consumer_timeout = 60000\n"
    )
    assert parse_topology(toml).warnings == ()


def test_warnings_come_with_the_errors_of_an_invalid_file() -> None:
    with pytest.raises(TopologyError) as raised:
        parse_topology('[queues.a]\ntimeout = 30\nprefetch = "5"\n', "topology.toml")
    assert raised.value.warnings == (
        Problem(
            "queues.a.timeout",
            '30 ms; did you mean "30s"?',
            'an integer is milliseconds; write "30s", or "30ms" to keep 30 ms',
        ),
    )
    assert (
        str(raised.value)
        .splitlines()[-1]
        .startswith('  warning: queues.a.timeout: 30 ms; did you mean "30s"?')
    )


# --- every error of a file at once, once each, in the file's order ---------------------------

EVERY_MISTAKE = """\
[defaults]
prefetch = "50"

[exchanges."amq.orders"]
type = "topic"
durable = "yes"

[queues.billing]
exclusive = true
max_body_size = 1.5
retry = { delays = ["5s", "1s"], max_attempts = "4" }
bindings = [{ exchange = "amq.orders", routing_key = "order.*" }]

[queues."billing.dlq"]
prefetch = 50.0
"""


def test_a_file_with_many_mistakes_reports_them_all_in_one_run() -> None:
    # Before, this took three runs: the 5 type errors, then the semantic errors, then the
    # collision hidden behind the 'amq.' error.
    with pytest.raises(TopologyError) as raised:
        parse_topology(EVERY_MISTAKE, "topology.toml")
    assert str(raised.value).splitlines() == [
        "topology.toml: 9 errors",
        "  defaults.prefetch: '50' is a string, not an integer (write prefetch = 50, "
        "without quotes)",
        "  exchanges.\"amq.orders\": names starting with 'amq.' are reserved by RabbitMQ "
        "(choose another prefix)",
        "  exchanges.\"amq.orders\".durable: 'yes' is a string, not true or false "
        "(write durable = true, without quotes)",
        "  queues.billing.exclusive: quorum queues cannot be exclusive "
        '(use queue_type = "classic")',
        '  queues.billing.max_body_size: 1.5 is a float; write bytes as an integer or e.g. "16MiB"',
        "  queues.billing.retry.delays[1]: delays must be strictly increasing (sort the delays; "
        "the last one repeats for further attempts)",
        "  queues.billing.retry.max_attempts: '4' is a string, not an integer "
        "(write max_attempts = 4, without quotes)",
        '  queues."billing.dlq": collides with a queue rabbitflow generates for queue '
        "'billing' (rename one of them)",
        '  queues."billing.dlq".prefetch: 50.0 is a float, not an integer (write prefetch = 50)',
    ]


def test_errors_come_in_the_order_of_the_file_across_tables() -> None:
    toml = (
        '[queues.b]\nprefetch = "1"\n'
        '[exchanges.x]\ntype = "topik"\n'
        "[queues.a]\nexclusive = true\nprefetch = 0\n"
        '[[queues.a.bindings]]\nexchange = "x"\nrouting_key = 1\n'
        '[[queues.a.bindings]]\nexchange = "nope"\n'
        "[defaults]\nprefetc = 1\n"
    )
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    assert [problem.path for problem in raised.value.problems] == [
        "queues.b.prefetch",
        "exchanges.x.type",
        "queues.a.exclusive",
        "queues.a.prefetch",
        "queues.a.bindings[0].routing_key",
        "queues.a.bindings[1].exchange",
        "defaults.prefetc",
    ]


def test_a_refused_value_does_not_stand_in_for_the_users_in_other_checks() -> None:
    # With the refused value replaced by its default, these would be false errors: "quorum
    # queues cannot be exclusive" (queue_type), "concurrency 40 exceeds prefetch 32"
    # (prefetch), and the same through a refused [defaults] value the queue inherits.
    toml = (
        '[defaults]\nqueue_type = "clasic"\n'
        "[queues.inherits]\nexclusive = true\n"
        '[queues.own]\nqueue_type = "Classic"\nexclusive = true\n'
        '[queues.busy]\nprefetch = "64"\nconcurrency = 40\n'
    )
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    assert [problem.path for problem in raised.value.problems] == [
        "defaults.queue_type",
        "queues.own.queue_type",
        "queues.busy.prefetch",
    ]


def test_one_bad_table_does_not_hide_the_mistakes_of_the_others() -> None:
    toml = (
        "[queues.broken]\nqueue_type = 3\n"
        '[queues.fine]\nretry = { delays = ["5s", "5s"] }\nauto_delete = true\n'
        '[queues."fine.retry.5s"]\n'
    )
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    assert [problem.path for problem in raised.value.problems] == [
        "queues.broken.queue_type",
        "queues.fine.retry.delays[1]",
        "queues.fine.auto_delete",
        'queues."fine.retry.5s"',
    ]


def test_one_mistake_is_reported_once() -> None:
    # A date for an integer argument: it can be neither sent nor read as a length.
    toml = '[queues.a]\narguments = { "x-max-length" = 2024-01-01 }\n'
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    assert [str(problem) for problem in raised.value.problems] == [
        'queues.a.arguments."x-max-length": a TOML date cannot be sent; use a full date-time '
        "or a string"
    ]


def test_several_errors_are_reported_at_once() -> None:
    toml = '[defaults]\nprefetc = 3\n[queues.a]\nprefetch = 0\n[exchanges.x]\ntype = "topik"\n'
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    assert str(raised.value).splitlines()[0] == "topology.toml: 3 errors"
    paths = [problem.path for problem in raised.value.problems]
    assert paths == ["defaults.prefetc", "queues.a.prefetch", "exchanges.x.type"]  # file order


def test_several_semantic_errors_are_reported_at_once() -> None:
    toml = '[queues."amq.a"]\nexclusive = true\nretry = { delays = ["5s", "1s"] }\n'
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    assert str(raised.value).splitlines()[0] == "topology.toml: 3 errors"


def test_schema_and_reference_errors_are_reported_together() -> None:
    toml = (
        '[exchanges.orders]\ntype = "topik"\n'
        '[queues."café"]\nprefetch = "many"\nbindings = [{ exchange = "order" }]\n'
    )
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    paths = [problem.path for problem in raised.value.problems]
    assert paths == [
        "exchanges.orders.type",
        'queues."café"',
        'queues."café".prefetch',
        'queues."café".bindings[0].exchange',
    ]
    assert 'did you mean "orders"?' in str(raised.value)


def test_every_name_validate_accepts_is_accepted_by_the_client() -> None:
    # The client's own check (pamqp) is the one that made `declare` crash half-way.
    from pamqp.commands import Exchange, Queue

    name = "Az09 -_.:@,/+"  # and '#', refused in queue names for another reason
    topology = parse_topology(f'[exchanges."{name}#"]\ntype = "topic"\n[queues."{name}"]\n')
    for spec in derive(topology).queues:
        Queue.Declare(queue=spec.name)
    for exchange in derive(topology).exchanges:
        Exchange.Declare(exchange=exchange.name)
    for bad in ("café", "a!", "x" * 128):
        with pytest.raises(TopologyError):
            parse_topology(f'[exchanges."{bad}"]\ntype = "topic"\n')
        with pytest.raises(ValueError, match="exchange"):
            Exchange.Declare(exchange=bad)


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text("[queues.a]\nprefetch = = 3\n", encoding="utf-8")
    with pytest.raises(TopologySyntaxError) as raised:
        load_topology(path)
    assert (raised.value.line, raised.value.column) == (2, 12)
    assert str(raised.value) == f"{path}:2:12: TOML syntax error: Invalid value"


def test_non_utf8_file_names_the_position(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_bytes("[queues.a]\n# café\n".encode("latin-1"))
    with pytest.raises(TopologySyntaxError) as raised:
        load_topology(path)
    assert str(raised.value) == f"{path}:2:6: the file is not valid UTF-8; save it as UTF-8"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="file not found"):
        load_topology(tmp_path / "nope.toml")


# --- properties -----------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**12))
def test_duration_labels_round_trip(millis: int) -> None:
    label = format_duration(millis)
    assert parse_duration(label) == millis
    number = int(label.rstrip("mhsd"))
    assert number > 0 or millis == 0


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_written_durations_survive_formatting(number: int, unit: str) -> None:
    millis = parse_duration(f"{number}{unit}")
    assert parse_duration(format_duration(millis)) == millis
    assert len(format_duration(millis)) <= len(f"{number}{unit}")


KEYS = [
    "broker", "url", "defaults", "dead_letter", "exchange", "exchanges", "queues", "queue_type",
    "prefetch", "concurrency", "timeout", "retry", "delays", "max_attempts", "crash_limit",
    "max_body_size", "type", "durable", "auto_delete", "internal", "exclusive", "arguments",
    "bindings", "routing_key", "x-match", "x-overflow", "x-max-length", "x-message-ttl",
    "x-queue-type", "x-max-age", "orders", "a", "a.dlq", "amq.x", "",
]  # fmt: skip
# TOML strings cannot hold lone surrogates; everything else goes.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    st.sampled_from(["5s", "1m", "0ms", "quorum", "classic", "stream", "topic", "headers", "all"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner),
    max_leaves=25,
)


def _string(text: str) -> str:
    escaped = (c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return '"' + "".join(escaped) + '"'


def _toml(value: Any) -> str:
    """Inline TOML for a JSON-like value."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_string(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    return repr(value)


def _loose(sensible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value (so that semantic checks run), sometimes anything at all."""
    return st.sampled_from(range(20)).flatmap(lambda i: VALUES if i == 19 else sensible)


def _table(
    required: dict[str, st.SearchStrategy[Any]] | None = None, /, **keys: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {k: _loose(v) for k, v in (required or {}).items()},
        optional={k: _loose(v) for k, v in keys.items()},
    )


ARGUMENT_KEYS = ["x-overflow", "x-max-length", "x-match", "x-single-active-consumer", "k"]
ARGUMENTS = st.dictionaries(
    st.sampled_from(ARGUMENT_KEYS),
    SCALARS | st.lists(SCALARS, max_size=2) | st.dictionaries(TEXT, SCALARS, max_size=2),
    max_size=3,
)
DURATION = st.sampled_from(["1s", "5s", "10s", "1m", 0, -5, 250])
RETRY: st.SearchStrategy[Any] = st.one_of(
    _table({"delays": st.lists(DURATION, max_size=3)}, max_attempts=st.integers(-1, 6)),
    st.just(False),
)
EXCHANGE_NAMES = st.sampled_from(["orders", "h", "dlx", "amq.topic", "amq.match", "", "nope"])
BINDING = _table({"exchange": EXCHANGE_NAMES}, routing_key=TEXT, arguments=ARGUMENTS)
QUEUE_SETTINGS: dict[str, st.SearchStrategy[Any]] = {
    "queue_type": st.sampled_from(["quorum", "classic", "stream"]),
    "prefetch": st.integers(0, 100),
    "concurrency": st.integers(1, 100),
    "timeout": DURATION,
    "retry": RETRY,
    "dead_letter": st.booleans(),
    "crash_limit": st.integers(0, 20),
    "max_body_size": st.sampled_from(["16MiB", 10]),
}
QUEUE = _table(
    **QUEUE_SETTINGS,
    durable=st.booleans(),
    exclusive=st.booleans(),
    auto_delete=st.booleans(),
    bindings=st.lists(BINDING, max_size=2),
    arguments=ARGUMENTS,
)
EXCHANGE = _table(
    {"type": st.sampled_from(["direct", "topic", "fanout", "headers"])},
    internal=st.booleans(),
    bindings=st.lists(BINDING, max_size=2),
    arguments=ARGUMENTS,
)
DOCUMENTS = _table(
    defaults=_table(**QUEUE_SETTINGS),
    dead_letter=_table(exchange=EXCHANGE_NAMES),
    exchanges=st.dictionaries(EXCHANGE_NAMES, EXCHANGE, max_size=3),
    queues=st.dictionaries(st.sampled_from(["a", "b", "a.dlq", "a.retry.1s", "x*", ""]), QUEUE),
)


def _parse_document(document: dict[str, Any]) -> None:
    text = "\n".join(f"{_string(key)} = {_toml(value)}" for key, value in document.items())
    with contextlib.suppress(TopologyError):
        parse_topology(text, "junk.toml")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_random_documents_raise_only_topology_errors(document: dict[str, Any]) -> None:
    _parse_document(document)


@settings(max_examples=500, deadline=None)
@given(DOCUMENTS)
def test_plausible_documents_raise_only_topology_errors(document: dict[str, Any]) -> None:
    _parse_document(document)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_raise_only_topology_errors(raw: bytes) -> None:
    with contextlib.suppress(TopologyError):
        parse_topology(raw, "junk.toml")


def test_the_worker_logs_the_warnings_of_its_topology(tmp_path: Path) -> None:
    # rabbitflow run loads the topology through App.load_topology.
    from structlog.testing import capture_logs

    from rabbitflow import App

    path = tmp_path / "topology.toml"
    path.write_text("[queues.a]\ntimeout = 30\n", encoding="utf-8")
    app = App(topology=path)

    @app.consumer("a")
    async def handle(body: bytes) -> None: ...

    with capture_logs() as logs:
        app.load_topology()
    assert [(entry["log_level"], entry["event"], entry["file"]) for entry in logs] == [
        (
            "warning",
            'queues.a.timeout: 30 ms; did you mean "30s"? '
            '(an integer is milliseconds; write "30s", or "30ms" to keep 30 ms)',
            str(path),
        )
    ]
