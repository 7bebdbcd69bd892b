"""The in-memory broker on its own: what RabbitMQ does that the differential suite does not cover.

Behaviour shared with RabbitMQ (routing, TTL/DLX, overflow, delivery limits, retries) is
checked against the real broker in ``tests/test_differential.py``; these tests pin the
channel-level details a consumer relies on (prefetch, competing consumers, channel errors).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq.exceptions
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from rabbitflow import App, Message
from rabbitflow.testing import MemoryBroker, MemoryChannel, TestApp
from rabbitflow.testing._routing import headers_match, topic_matches
from rabbitflow.topology import parse_topology
from tests.support.amqp import dead_letter_to


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def channel(broker: MemoryBroker) -> MemoryChannel:
    return await broker.connect().channel()


def props(**headers: Any) -> spec.Basic.Properties:
    return spec.Basic.Properties(headers=headers or None)


class Inbox:
    """A consumer callback that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[DeliveredMessage] = []

    async def __call__(self, message: DeliveredMessage) -> None:
        self.messages.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# -- matching ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("a.*.#", "a.b", True),
        ("a.*.#", "a", False),
        ("#.#.#", "", True),
        ("*.#.*", "a", False),
        ("*.#.*", "a.b", True),
        ("a.#", "a.", True),
        ("#.b", "a..b", True),
        ("a.*.c", "a.b.c.c", False),
    ],
)
def test_topic_matching_edge_cases(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_headers_match_compares_type_classes() -> None:
    binding = {"x-match": "all", "n": 1}
    assert headers_match(binding, {"n": 1})
    assert not headers_match(binding, {"n": "1"})
    assert not headers_match(binding, {"n": True})
    assert not headers_match(binding, {"n": 1.0})


# -- consumers -----------------------------------------------------------------------------


async def test_competing_consumers_get_messages_round_robin(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q")
    first, second = Inbox(), Inbox()
    await channel.basic_consume("q", first, no_ack=True)
    await channel.basic_consume("q", second, no_ack=True)
    for i in range(4):
        await channel.basic_publish(str(i).encode(), routing_key="q")
    await settle()
    assert first.bodies == [b"0", b"2"]
    assert second.bodies == [b"1", b"3"]


async def test_prefetch_holds_back_deliveries_until_acked(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q")
    inbox = Inbox()
    await channel.basic_qos(prefetch_count=2)
    await channel.basic_consume("q", inbox)
    for i in range(5):
        await channel.basic_publish(str(i).encode(), routing_key="q")
    await settle()
    assert inbox.bodies == [b"0", b"1"]
    assert len(broker.queue("q")) == 3

    await channel.basic_ack(2, multiple=True)
    await settle()
    assert inbox.bodies == [b"0", b"1", b"2", b"3"]


async def test_closing_a_channel_returns_its_unacked_deliveries(broker: MemoryBroker) -> None:
    broker.declare_queue("q")
    connection = broker.connect()
    consuming = await connection.channel()
    await consuming.basic_consume("q", Inbox())
    publisher = await connection.channel()
    await publisher.basic_publish(b"m", routing_key="q")
    await settle()
    assert len(broker.queue("q")) == 0

    await consuming.close()
    (message,) = broker.queue("q").messages
    assert message.body == b"m"
    assert message.redelivered


async def test_acking_an_unknown_tag_closes_the_channel(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q")
    await channel.basic_publish(b"m", routing_key="q")
    got = await channel.basic_get("q")
    await channel.basic_ack(got.delivery_tag or 0)

    await channel.basic_ack(got.delivery_tag or 0)  # twice: RabbitMQ closes the channel

    assert channel.is_closed
    assert isinstance(broker.errors[0], aiormq.exceptions.ChannelPreconditionFailed)
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await channel.basic_publish(b"m", routing_key="q")


async def test_an_auto_delete_queue_goes_with_its_last_consumer(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q", durable=False, auto_delete=True)
    ok = await channel.basic_consume("q", Inbox())
    await channel.basic_cancel(ok.consumer_tag or "")
    assert "q" not in broker.queues


async def test_deleting_a_queue_tells_its_consumers(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q")
    cancelled: list[Any] = []
    channel.on_consumer_cancel_callbacks.add(cancelled.append)
    ok = await channel.basic_consume("q", Inbox())
    broker.delete_queue("q")
    assert [frame.consumer_tag for frame in cancelled] == [ok.consumer_tag]


# -- publishing ----------------------------------------------------------------------------


async def test_publishing_to_a_missing_exchange_closes_the_channel(channel: MemoryChannel) -> None:
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.basic_publish(b"m", exchange="nope", routing_key="k")
    assert channel.is_closed


async def test_unroutable_publish_is_returned_only_when_mandatory(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_exchange("x", "direct")
    confirm = await channel.basic_publish(b"m", exchange="x", routing_key="k")
    assert isinstance(confirm, spec.Basic.Ack)
    with pytest.raises(aiormq.exceptions.PublishError):
        await channel.basic_publish(b"m", exchange="x", routing_key="k", mandatory=True)


async def test_returns_go_to_callbacks_without_on_return_raises(broker: MemoryBroker) -> None:
    broker.declare_exchange("x", "direct")
    channel = await broker.connect().channel(on_return_raises=False)
    returned: list[DeliveredMessage] = []
    channel.on_return_callbacks.add(returned.append)
    confirm = await channel.basic_publish(b"m", exchange="x", routing_key="k", mandatory=True)
    assert isinstance(confirm, spec.Basic.Ack)
    assert [m.body for m in returned] == [b"m"]


async def test_headers_that_amqp_cannot_encode_are_refused_like_a_real_publish(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q")
    with pytest.raises(TypeError):
        await channel.basic_publish(b"m", routing_key="q", properties=props(raw=b"bytes"))


async def test_a_publish_without_message_id_gets_one_as_with_aiormq(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q")
    await channel.basic_publish(b"m", routing_key="q")
    assert broker.queue("q").messages[0].message_id


async def test_alternate_exchange_takes_what_the_exchange_cannot_route(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_exchange("unrouted", "fanout")
    broker.declare_queue("lost")
    broker.bind_queue("lost", "unrouted")
    broker.declare_exchange("x", "direct", arguments={"alternate-exchange": "unrouted"})
    await channel.basic_publish(b"m", exchange="x", routing_key="k", mandatory=True)
    assert [m.body for m in broker.queue("lost").messages] == [b"m"]


async def test_internal_exchanges_refuse_client_publishes(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_exchange("inner", "fanout", internal=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await channel.basic_publish(b"m", exchange="inner")


# -- declarations --------------------------------------------------------------------------


def test_redeclaring_with_other_arguments_fails_like_rabbitmq(broker: MemoryBroker) -> None:
    broker.declare_queue("q", arguments={"x-message-ttl": 100})
    broker.declare_queue("q", arguments={"x-message-ttl": 100})  # same: fine
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-message-ttl"):
        broker.declare_queue("q", arguments={"x-message-ttl": 200})


@pytest.mark.parametrize(
    "options",
    [{"durable": False}, {"exclusive": True}, {"auto_delete": True}],
)
def test_quorum_queues_refuse_what_rabbitmq_refuses(
    broker: MemoryBroker, options: dict[str, bool]
) -> None:
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        broker.declare_queue("q", arguments={"x-queue-type": "quorum"}, **options)


def test_binding_to_a_missing_exchange_is_not_found(broker: MemoryBroker) -> None:
    broker.declare_queue("q")
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        broker.bind_queue("q", "missing", "k")


# -- time ----------------------------------------------------------------------------------


async def test_per_message_ttl_expires_only_at_the_head(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("q")
    await channel.basic_publish(b"long", routing_key="q")
    short = spec.Basic.Properties(expiration="100")
    await channel.basic_publish(b"short", routing_key="q", properties=short)

    broker.advance("1s")
    assert [m.body for m in broker.queue("q").messages] == [b"long", b"short"]

    got = await channel.basic_get("q", no_ack=True)
    assert got.body == b"long"
    assert isinstance((await channel.basic_get("q")).delivery, spec.Basic.GetEmpty)


async def test_ttl_zero_reaches_a_waiting_consumer_and_dies_otherwise(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("dead")
    broker.declare_queue("q", arguments={"x-message-ttl": 0, **dead_letter_to("dead")})
    await channel.basic_publish(b"nobody", routing_key="q")
    inbox = Inbox()
    await channel.basic_consume("q", inbox, no_ack=True)
    await channel.basic_publish(b"someone", routing_key="q")
    await settle()
    assert inbox.bodies == [b"someone"]
    assert [m.body for m in broker.queue("dead").messages] == [b"nobody"]


async def test_advance_expires_a_chain_in_deadline_order(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    broker.declare_queue("end")
    broker.declare_queue("slow", arguments={"x-message-ttl": 300, **dead_letter_to("end")})
    broker.declare_queue("fast", arguments={"x-message-ttl": 100, **dead_letter_to("slow")})
    await channel.basic_publish(b"m", routing_key="fast")

    broker.advance(399)
    assert len(broker.queue("slow")) == 1
    broker.advance(1)
    (message,) = broker.queue("end").messages
    assert [d["queue"] for d in message.headers["x-death"]] == ["slow", "fast"]
    assert broker.next_deadline() is None


@pytest.mark.parametrize(("version", "counted", "acquired"), [("4.0", 1, 1), ("4.3", 0, 1)])
async def test_a_shutdown_gives_back_what_it_cut_short_as_the_modelled_version_counts_it(
    version: str, counted: int, acquired: int
) -> None:
    # Given a TestApp on a quorum queue whose handler never finishes
    app = App(name="slow")
    started = asyncio.Event()

    @app.consumer("slow")
    async def slow(message: Message) -> None:
        started.set()
        await asyncio.sleep(3600)

    broker = MemoryBroker(version=version)
    topology = parse_topology('[queues.slow]\nqueue_type = "quorum"\n')

    # When it shuts down while the handler runs
    async with TestApp(app, topology, broker=broker) as t:
        await t.publish("", "slow", {"n": 1})
        broker.pump_all()
        await asyncio.wait_for(started.wait(), 5)

    # Then the message is back in its queue; 4.3 gave it back with a nack, which does not
    # count toward crash_limit (4.0 counts every return)
    [envelope] = broker.queue("slow").ready
    assert (envelope.delivery_count, envelope.acquired_count) == (counted, acquired)
