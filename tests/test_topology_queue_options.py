"""``single_active_consumer`` and ``consumer_timeout`` on a queue: derived, checked, declared."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from rabbitflow.errors import TopologyError
from rabbitflow.topology import derive, parse_topology
from rabbitflow.topology._declare import declare
from tests.support.broker import Rabbit, version_of


def _work_arguments(toml: str) -> dict[str, object]:
    declarations = derive(parse_topology(toml, "topology.toml"))
    return next(q.arguments for q in declarations.queues if q.role == "work")


def _problems(toml: str) -> list[str]:
    with pytest.raises(TopologyError) as raised:
        parse_topology(toml, "topology.toml")
    return [str(problem) for problem in raised.value.problems]


def test_single_active_consumer_is_declared_on_the_work_queue_only() -> None:
    toml = '[queues.ledger]\nsingle_active_consumer = true\nretry = { delays = ["5s"] }\n'
    assert _work_arguments(toml)["x-single-active-consumer"] is True
    side = [q for q in derive(parse_topology(toml)).queues if q.role != "work"]
    assert side
    assert all("x-single-active-consumer" not in q.arguments for q in side)


def test_single_active_consumer_is_refused_on_a_stream() -> None:
    problems = _problems(
        '[queues.events]\nqueue_type = "stream"\nprefetch = 10\nsingle_active_consumer = true\n'
    )
    assert any(
        p.startswith("queues.events.single_active_consumer: stream queues do not support")
        for p in problems
    ), problems


def test_the_raw_arguments_point_to_the_keys() -> None:
    problems = _problems(
        '[queues.a]\ntimeout = "1m"\n'
        'arguments = { "x-single-active-consumer" = true, "x-consumer-timeout" = 60000 }\n'
    )
    assert any("single_active_consumer = true instead" in p for p in problems), problems
    assert any('consumer_timeout = "45m" instead' in p for p in problems), problems


def test_consumer_timeout_is_declared_in_milliseconds_and_inherits_from_defaults() -> None:
    assert (
        _work_arguments('[queues.a]\ntimeout = "10m"\nconsumer_timeout = "1h"\n')[
            "x-consumer-timeout"
        ]
        == 3_600_000
    )
    inherited = '[defaults]\nconsumer_timeout = "2h"\ntimeout = "1h"\n[queues.a]\n'
    assert _work_arguments(inherited)["x-consumer-timeout"] == 7_200_000
    assert "x-consumer-timeout" not in _work_arguments("[queues.a]\n")


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            'timeout = "1h"\nconsumer_timeout = "30m"',
            "queues.a.timeout: handler timeout 1h is not below consumer_timeout 30m",
        ),
        (
            'timeout = "30m"\nconsumer_timeout = "30m"',
            "queues.a.timeout: handler timeout 30m is not below consumer_timeout 30m",
        ),
        (
            'consumer_timeout = "30m"',
            "queues.a.timeout: no handler timeout, but consumer_timeout is 30m",
        ),
        ("timeout = 10\nconsumer_timeout = 0", "queues.a.consumer_timeout: consumer_timeout must"),
    ],
)
def test_validate_checks_the_handler_timeout_against_consumer_timeout(
    settings: str, expected: str
) -> None:
    problems = _problems(f"[queues.a]\n{settings}\n")
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.broker
async def test_declared_on_the_broker_and_one_consumer_gets_everything(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    # Given a queue with single_active_consumer and consumer_timeout, declared
    topology = parse_topology(
        '[queues.ledger]\nqueue_type = "classic"\nsingle_active_consumer = true\n'
        'timeout = "1m"\nconsumer_timeout = "15m"\n'
    )
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        await declare(connection, derive(topology))
        rows = rabbit.list(vhost, "queues", "name", "arguments")
        arguments = dict(rows)["ledger"]
        # 3.10 keeps x-consumer-timeout on the queue (and ignores it: per-queue consumer
        # timeouts take effect from RabbitMQ 3.12 on); 4.3 refuses it on a classic queue,
        # whose consumers it never times out, so it is not declared there.
        version = version_of(connection)
        assert "x-single-active-consumer" in arguments
        assert ("x-consumer-timeout" in arguments) is version.accepts_consumer_timeout("classic")

        # When two consumers consume it and messages arrive
        got: dict[int, list[bytes]] = {1: [], 2: []}
        channels = [await connection.channel() for _ in range(2)]
        for number, channel in enumerate(channels, start=1):
            queue = await channel.get_queue("ledger", ensure=False)

            async def on(message: aio_pika.abc.AbstractIncomingMessage, n: int = number) -> None:
                got[n].append(message.body)
                await message.ack()

            await queue.consume(on)
        publisher = await connection.channel()
        for i in range(10):
            await publisher.default_exchange.publish(aio_pika.Message(str(i).encode()), "ledger")
        for _ in range(100):
            if len(got[1]) + len(got[2]) == 10:
                break
            await asyncio.sleep(0.05)

    # Then the first consumer got every message, in order
    assert got[2] == []
    assert got[1] == [str(i).encode() for i in range(10)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"first"', "first"), ("1200", 1200), ("2026-10-01T00:00:00Z", "datetime")],
)
def test_stream_offset_takes_a_position_an_offset_or_a_time(value: str, expected: object) -> None:
    toml = f'[queues.events]\nqueue_type = "stream"\nprefetch = 10\nstream_offset = {value}\n'
    offset = parse_topology(toml).queues["events"].stream_offset
    assert (type(offset).__name__ if expected == "datetime" else offset) == expected


def test_stream_offset_is_refused_on_other_queues_and_for_unknown_positions() -> None:
    problems = _problems('[queues.a]\nstream_offset = "first"\n')
    assert any(p.startswith("queues.a.stream_offset: only stream queues") for p in problems)
    bad = '[queues.e]\nqueue_type = "stream"\nstream_offset = "start"\n'
    assert any(p.startswith("queues.e.stream_offset") for p in _problems(bad))


def test_a_stream_runs_its_attempts_in_place_and_has_no_retry_tiers() -> None:
    toml = (
        '[queues.events]\nqueue_type = "stream"\nprefetch = 10\n'
        'retry = { delays = ["1s", "5s"], max_attempts = 4 }\n'
    )
    topology = parse_topology(toml)
    assert topology.queues["events"].immediate_retries == 3
    declarations = derive(topology)
    assert [q.role for q in declarations.queues] == ["work", "dlq"]
    assert declarations.routes["events"].tiers == {}
