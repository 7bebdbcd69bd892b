"""``app.publish_many``: a batch written in a few large writes, confirmed message by message.

Against the real RabbitMQ: a clean batch is all confirmed and queued in order; an unroutable
message in the middle and messages nacked by a full ``reject-publish`` queue are reported by
index and message id while the rest are confirmed; a channel closed mid-batch fails every
message it did not confirm, none silently.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aio_pika
import pytest
from pydantic import BaseModel

from rabbitflow import App, BatchPublishError, PublishError, UnroutableError

pytestmark = pytest.mark.broker


class Order(BaseModel):
    order_id: int


@pytest.fixture
async def channel(vhost_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(vhost_url)
    yield await connection.channel()
    await connection.close()


async def drain(queue: aio_pika.abc.AbstractQueue, count: int) -> list[dict[str, int]]:
    bodies = []
    for _ in range(count):
        message = await queue.get(timeout=5, no_ack=True)
        assert message is not None
        bodies.append(json.loads(message.body))
    return bodies


async def test_every_message_confirmed_and_queued_in_order(
    caller: App, channel: aio_pika.abc.AbstractChannel
) -> None:
    queue = await channel.declare_queue("batch.ok", durable=True)

    ids = await caller.publish_many("", "batch.ok", [Order(order_id=i) for i in range(1200)])

    assert len(ids) == 1200
    assert len(set(ids)) == 1200
    declared = await channel.declare_queue("batch.ok", passive=True)
    assert declared.declaration_result.message_count == 1200
    bodies = await drain(queue, 1200)
    assert [b["order_id"] for b in bodies] == list(range(1200))


async def test_given_message_ids_are_used(
    caller: App, channel: aio_pika.abc.AbstractChannel
) -> None:
    queue = await channel.declare_queue("batch.ids", durable=True)

    ids = await caller.publish_many("", "batch.ids", [{"n": 1}, {"n": 2}], message_ids=["a", "b"])

    assert ids == ["a", "b"]
    first = await queue.get(timeout=5, no_ack=True)
    assert first is not None
    assert first.message_id == "a"
    with pytest.raises(ValueError, match="2 message_ids for 3 payloads"):
        await caller.publish_many("", "batch.ids", [1, 2, 3], message_ids=["a", "b"])


async def test_unroutable_message_in_the_middle_is_reported_the_others_confirmed(
    caller: App, channel: aio_pika.abc.AbstractChannel
) -> None:
    exchange = await channel.declare_exchange("batch.direct", aio_pika.ExchangeType.DIRECT)
    queue = await channel.declare_queue("batch.routed", durable=True)
    await queue.bind(exchange, "order")

    async with caller.batch() as batch:
        for i in range(9):
            key = "nowhere" if i == 4 else "order"
            batch.publish("batch.direct", key, {"i": i}, message_id=f"m{i}")
        with pytest.raises(BatchPublishError) as caught:
            await batch.send()

    error = caught.value
    assert isinstance(error, PublishError)
    assert [(f.index, f.message_id) for f in error.failures] == [(4, "m4")]
    assert isinstance(error.failures[0].error, UnroutableError)
    assert error.failures[0].error.routing_key == "nowhere"
    assert error.missing
    assert error.confirmed == tuple(f"m{i}" for i in range(9) if i != 4)
    bodies = await drain(queue, 8)
    assert [b["i"] for b in bodies] == [0, 1, 2, 3, 5, 6, 7, 8]


async def test_a_block_that_raises_sends_nothing(
    caller: App, channel: aio_pika.abc.AbstractChannel
) -> None:
    await channel.declare_queue("batch.aborted", durable=True)

    async def fails_half_way() -> None:
        async with caller.batch() as batch:
            batch.publish("", "batch.aborted", {"i": 1})
            raise LookupError("no price")

    with pytest.raises(LookupError):
        await fails_half_way()
    async with caller.batch() as batch:
        batch.publish("", "batch.aborted", {"i": 2})

    assert len(batch.message_ids) == 1
    declared = await channel.declare_queue("batch.aborted", passive=True)
    assert declared.declaration_result.message_count == 1


async def test_nacks_of_a_full_reject_publish_queue_are_reported_by_index(
    caller: App, channel: aio_pika.abc.AbstractChannel
) -> None:
    # reject-publish: a queue at x-max-length refuses new messages with basic.nack instead
    # of dropping its head, so the publisher learns which ones were not taken.
    await channel.declare_queue(
        "batch.bounded",
        durable=True,
        arguments={"x-max-length": 3, "x-overflow": "reject-publish"},
    )
    ids = [f"n{i}" for i in range(6)]

    with pytest.raises(BatchPublishError) as caught:
        await caller.publish_many(
            "", "batch.bounded", [{"i": i} for i in range(6)], message_ids=ids
        )

    error = caught.value
    assert [(f.index, f.message_id) for f in error.failures] == [(3, "n3"), (4, "n4"), (5, "n5")]
    assert all("nacked" in f.error.reason for f in error.failures)
    assert all(f.sent for f in error.failures)
    assert error.confirmed == ("n0", "n1", "n2")
    assert "3 of 6 messages not confirmed; first: #3 (n3)" in str(error)


async def test_channel_closed_mid_batch_fails_every_unconfirmed_message(
    caller: App, channel: aio_pika.abc.AbstractChannel
) -> None:
    await channel.declare_queue("batch.closing", durable=True)
    await caller.publish("", "batch.closing", {"warm": 1})  # the caller's channel is open
    publisher = caller._publisher
    assert publisher is not None
    payloads = [{"i": i, "pad": "x" * 1000} for i in range(20_000)]

    async def close_soon() -> None:
        await asyncio.sleep(0.01)
        # What the broker does to a channel that breaks a rule (a 404, a 406): closes it.
        await publisher.channel.close()

    closer = asyncio.create_task(close_soon())
    with pytest.raises(BatchPublishError) as caught:
        await caller.publish_many("", "batch.closing", payloads)
    await closer

    error = caught.value
    failed = {f.index for f in error.failures}
    assert failed, "the batch was cut short, so some messages are unconfirmed"
    assert len(error.confirmed) + len(failed) == 20_000
    assert all("channel" in f.error.reason for f in error.failures)
    assert any(not f.sent for f in error.failures), "messages after the close were never sent"
    # Nothing confirmed is missing: every confirmed message is in the queue.
    declared = await channel.declare_queue("batch.closing", passive=True)
    assert declared.declaration_result.message_count >= 1 + len(error.confirmed)
    # The next batch gets a fresh channel.
    assert len(await caller.publish_many("", "batch.closing", [{"after": 1}])) == 1
