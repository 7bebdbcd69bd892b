"""The in-memory broker's direct reply-to behaves as RabbitMQ 3.10 does (checked against it)."""

from __future__ import annotations

import asyncio

import aiormq.exceptions as amqp_errors
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from rabbitflow import RemoteError
from rabbitflow._publisher import Publisher
from rabbitflow._rpc import REPLY_TO, Replier, Requester, read_reply
from rabbitflow.testing import MemoryBroker


async def settle(broker: MemoryBroker) -> None:
    """Let every delivery the broker started run to its end."""
    while pending := broker.pending():
        await asyncio.wait(pending)


async def responder(broker: MemoryBroker, queue: str, fail: bool = False) -> None:
    connection = broker.connect()
    channel = await connection.channel()
    replier = Replier(queue, Publisher(connection, channel))  # type: ignore[arg-type]

    async def on_request(delivery: DeliveredMessage) -> None:
        if fail:
            await replier.reply_error(delivery, ValueError("bad sku"))
        else:
            await replier.reply(delivery, {"got": delivery.body.decode()})

    await channel.basic_consume(queue, on_request, no_ack=True)


async def test_a_request_gets_its_reply_over_direct_reply_to() -> None:
    broker = MemoryBroker()
    broker.declare_queue("pricing", arguments={"x-queue-type": "classic"})
    await responder(broker, "pricing")
    requester = await Requester.open(broker.connect())  # type: ignore[arg-type]

    reply = await requester.request("", "pricing", "A1", timeout=1)

    assert read_reply(reply) == {"got": "A1"}
    assert reply.header.properties.correlation_id
    assert requester.in_flight == 0


async def test_a_final_failure_is_read_as_remote_error() -> None:
    broker = MemoryBroker()
    broker.declare_queue("pricing")
    await responder(broker, "pricing", fail=True)
    requester = await Requester.open(broker.connect())  # type: ignore[arg-type]

    reply = await requester.request("", "pricing", "A1", timeout=1)

    with pytest.raises(RemoteError, match="ValueError: bad sku"):
        read_reply(reply)


async def test_the_responder_sees_a_generated_reply_address() -> None:
    broker = MemoryBroker()
    broker.declare_queue("pricing")
    seen: list[str | None] = []
    connection = broker.connect()
    server = await connection.channel()

    async def on_request(delivery: DeliveredMessage) -> None:
        seen.append(delivery.header.properties.reply_to)

    await server.basic_consume("pricing", on_request, no_ack=True)
    client = await connection.channel()
    await client.basic_consume(REPLY_TO, on_request, no_ack=True)
    await client.basic_publish(
        b"x", routing_key="pricing", properties=spec.Basic.Properties(reply_to=REPLY_TO)
    )
    await settle(broker)
    assert seen[0] is not None
    assert seen[0].startswith(REPLY_TO + ".")
    assert seen[0] == client.reply_address


async def test_a_request_without_a_reply_consumer_on_its_channel_closes_the_channel() -> None:
    broker = MemoryBroker()
    broker.declare_queue("pricing")
    channel = await broker.connect().channel()
    with pytest.raises(amqp_errors.ChannelPreconditionFailed, match="fast reply consumer"):
        await channel.basic_publish(
            b"x", routing_key="pricing", properties=spec.Basic.Properties(reply_to=REPLY_TO)
        )
    assert channel.is_closed


async def test_a_reply_consumer_that_acks_is_refused() -> None:
    channel = await MemoryBroker().connect().channel()

    async def ignore(delivery: DeliveredMessage) -> None:
        return None

    with pytest.raises(amqp_errors.ChannelPreconditionFailed, match="cannot acknowledge"):
        await channel.basic_consume(REPLY_TO, ignore, no_ack=False)


async def test_a_mandatory_reply_is_returned_even_when_delivered() -> None:
    # RabbitMQ counts a reply-to address as no queue for the mandatory flag.
    broker = MemoryBroker()
    connection = broker.connect()
    client = await connection.channel()
    got: list[bytes] = []

    async def collect(delivery: DeliveredMessage) -> None:
        got.append(delivery.body)

    await client.basic_consume(REPLY_TO, collect, no_ack=True)
    assert client.reply_address is not None
    server = await connection.channel(publisher_confirms=True, on_return_raises=True)
    with pytest.raises(amqp_errors.PublishError):
        await server.basic_publish(b"r", routing_key=client.reply_address, mandatory=True)
    confirm = await server.basic_publish(b"r2", routing_key=client.reply_address)
    await settle(broker)
    assert isinstance(confirm, spec.Basic.Ack)
    assert got == [b"r", b"r2"]


async def test_a_reply_to_a_gone_requester_is_dropped_and_confirmed() -> None:
    broker = MemoryBroker()
    connection = broker.connect()
    client = await connection.channel()

    async def ignore(delivery: DeliveredMessage) -> None:
        return None

    await client.basic_consume(REPLY_TO, ignore, no_ack=True)
    address = client.reply_address
    assert address is not None
    await client.close()
    server = await connection.channel(publisher_confirms=True)
    assert isinstance(await server.basic_publish(b"late", routing_key=address), spec.Basic.Ack)
    assert broker.reply_channels == {}
