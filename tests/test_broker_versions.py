"""RabbitMQ 3.10 and 4.x: the version read at connect, DLQs no broker default can empty,
quorum placement, and the declarations RabbitMQ 4.3 refuses.

The broker tests run on whichever RabbitMQ ``RABBITFLOW_TEST_URL`` names; ``.ci/run`` runs them
on 3.10 and on 4.0.
"""

from __future__ import annotations

import json
from typing import Any

import aio_pika
import pytest

from rabbitflow import dlq
from rabbitflow._broker_version import BrokerVersion
from rabbitflow.errors import TopologyError
from rabbitflow.topology import derive, parse_topology
from rabbitflow.topology._declare import declare
from rabbitflow.topology._derived import UNLIMITED_DELIVERIES
from rabbitflow.topology._plan import plan
from tests.support.broker import Rabbit, broker_version

PLACED = (
    '[defaults]\nleader_locator = "balanced"\ninitial_group_size = 1\n'
    '[exchanges.jobs]\ntype = "direct"\n'
    '[queues.work]\nbindings = [{ exchange = "jobs", routing_key = "work" }]\n'
    'retry = { delays = ["1s"] }\n'
)


# -- offline ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version", "expected"),
    [
        ("4.0.5", BrokerVersion(4, 0, 5), "4.0.5"),
        ("3.10.8", BrokerVersion(3, 10, 8), "3.10.8"),
        ("3.13.0-rc.1", BrokerVersion(3, 13, 0), "3.13.0"),
        ("4.1", BrokerVersion(4, 1, 0), "4.1.0"),
    ],
)
def test_versions_are_read_from_what_the_server_announces(
    text: str, version: BrokerVersion, expected: str
) -> None:
    assert BrokerVersion.from_properties({"version": text.encode()}) == version
    assert str(version) == expected


def test_unknown_versions_are_none() -> None:
    assert BrokerVersion.from_properties({}) is None
    assert BrokerVersion.parse("unknown") is None


@pytest.mark.parametrize(
    ("version", "head", "first_count", "default_limit", "transient"),
    [
        ("3.10.8", False, True, None, True),
        ("3.13.7", False, False, None, True),
        ("4.0.5", True, False, 20, True),
        ("4.3.0", True, False, 20, False),
    ],
)
def test_what_differs_between_releases(
    version: str, head: bool, first_count: bool, default_limit: int | None, transient: bool
) -> None:
    parsed = BrokerVersion.parse(version)
    assert parsed is not None
    assert parsed.requeue_to_head is head
    assert parsed.counts_first_delivery is first_count
    assert parsed.default_delivery_limit == default_limit
    assert parsed.accepts_transient_queues is transient
    assert parsed.accepts_global_qos is transient


def test_placement_applies_to_the_queue_its_tiers_and_its_dlq() -> None:
    queues = {spec.name: spec.arguments for spec in derive(parse_topology(PLACED)).queues}

    assert set(queues) == {"work", "work.retry.1s", "work.dlq"}
    for name, arguments in queues.items():
        assert arguments["x-queue-leader-locator"] == "balanced", name
        assert arguments["x-quorum-initial-group-size"] == 1, name
    assert queues["work.dlq"]["x-delivery-limit"] == UNLIMITED_DELIVERIES


def test_a_stream_is_placed_with_its_own_size_argument() -> None:
    text = '[queues.events]\nqueue_type = "stream"\ninitial_group_size = 3\nretry = false\n'
    queues = {spec.name: spec.arguments for spec in derive(parse_topology(text)).queues}

    assert queues["events"]["x-initial-cluster-size"] == 3
    assert queues["events.dlq"]["x-quorum-initial-group-size"] == 3


def test_validate_refuses_what_rabbitmq_43_refuses_and_misplaced_placement() -> None:
    text = (
        '[queues.scratch]\nqueue_type = "classic"\ndurable = false\nretry = false\n'
        'leader_locator = "balanced"\ndead_letter = false\n'
        '[queues.mine]\nqueue_type = "classic"\ndurable = false\nexclusive = true\n'
        "retry = false\ndead_letter = false\n"
    )
    with pytest.raises(TopologyError) as caught:
        parse_topology(text)

    assert [str(problem) for problem in caught.value.problems] == [
        "queues.scratch.durable: a transient queue that is not exclusive is refused by "
        "RabbitMQ 4.3 and later (remove durable = false, or set exclusive = true for a "
        "per-connection queue)",
        "queues.scratch.leader_locator: placement applies to quorum and stream queues, which "
        "are replicated; a classic queue lives on the node that declared it (remove "
        'leader_locator or use queue_type = "quorum")',
    ]


# -- on the broker -------------------------------------------------------------------------


def _arguments(rabbit: Rabbit, vhost: str) -> dict[str, dict[str, Any]]:
    out = rabbit.ctl("list_queues", "-p", vhost, "name", "arguments", "--formatter", "json")
    return {
        row["name"]: {name: value for name, _type, value in row["arguments"]}
        for row in json.loads(out)
    }


@pytest.mark.broker
async def test_the_version_read_at_connect_is_the_servers(rabbit: Rabbit, vhost_url: str) -> None:
    version = await broker_version(vhost_url)

    assert version.supported
    assert str(version) in rabbit.ctl("version")


@pytest.mark.broker
async def test_a_dlq_keeps_its_messages_however_often_it_is_listed(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    # Given a DLQ holding 3 messages (RabbitMQ 4.0 would drop them after 20 returns by default)
    connection = await aio_pika.connect(vhost_url)
    try:
        await declare(connection, derive(parse_topology(PLACED)))
        channel = await connection.channel()
        for n in range(3):
            await channel.default_exchange.publish(aio_pika.Message(str(n).encode()), "work.dlq")

        # When `dlq list` reads it 25 times
        counts = []
        for _ in range(25):
            seen = await dlq.peek(connection, "work", limit=10)
            counts.append((seen.count, [m.body_preview for m in seen.messages]))
        left = await channel.declare_queue("work.dlq", passive=True)
    finally:
        await connection.close()

    # Then every read saw the 3 messages, in order, and they are still there
    assert counts == [(3, ["0", "1", "2"])] * 25
    assert left.declaration_result.message_count == 3


@pytest.mark.broker
async def test_placement_is_declared_as_written(rabbit: Rabbit, vhost: str, vhost_url: str) -> None:
    connection = await aio_pika.connect(vhost_url)
    try:
        await declare(connection, derive(parse_topology(PLACED)))
    finally:
        await connection.close()

    arguments = _arguments(rabbit, vhost)
    for name in ("work", "work.retry.1s", "work.dlq"):
        assert arguments[name]["x-queue-leader-locator"] == "balanced", name
        assert arguments[name]["x-quorum-initial-group-size"] == 1, name
    assert arguments["work.dlq"]["x-delivery-limit"] == UNLIMITED_DELIVERIES


@pytest.mark.broker
async def test_a_dlq_declared_by_an_earlier_rabbitflow_is_kept_as_it_is(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    # Given work.dlq as rabbitflow declared it before DLQs got a delivery limit, with a message
    topology = parse_topology("[queues.work]\nretry = false\n")
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue("work.dlq", durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(aio_pika.Message(b"parked"), "work.dlq")

        # When the topology is planned and declared
        planned = await plan(connection, derive(topology))
        await declare(connection, derive(topology))
        left = await channel.declare_queue("work.dlq", passive=True)
    finally:
        await connection.close()

    # Then the queue is accepted as it is, message and all, instead of a conflict
    assert planned.action_of("queue", "work.dlq") == "ok"
    assert not planned.conflicts
    assert left.declaration_result.message_count == 1
    assert "x-delivery-limit" not in _arguments(rabbit, vhost)["work.dlq"]
