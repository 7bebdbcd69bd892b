"""Talking to the broker as a producer or an operator would: publish, drain, count, declare."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from rabbitflow import App
from rabbitflow.topology import derive
from rabbitflow.topology._declare import declare
from tests.support.waiting import eventually


def _message(
    body: bytes, message_id: str, headers: dict[str, Any] | None, **properties: Any
) -> aio_pika.Message:
    properties.setdefault("content_type", "application/json")
    return aio_pika.Message(
        body,
        message_id=message_id,
        headers=headers or {},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **properties,
    )


async def publish_one(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    message_id: str,
    headers: dict[str, Any] | None = None,
    **properties: Any,
) -> None:
    """Publish one persistent message with confirms, mandatory (as any producer would);
    ``properties`` are aio-pika's (``content_type``, ``correlation_id``...)."""
    await publish_async(
        url, exchange, routing_key, [(message_id, body)], headers=lambda _: headers or {},
        **properties,
    )  # fmt: skip


async def publish_async(
    url: str,
    exchange: str,
    routing_key: str,
    messages: Iterable[tuple[str, bytes]],
    *,
    headers: Callable[[str], dict[str, Any]] | None = None,
    **properties: Any,
) -> int:
    """Publish ``(message_id, body)`` pairs with confirms, mandatory; return the count.

    ``exchange`` "" is the default exchange (``routing_key`` is then a queue name)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange, ensure=False) if exchange else None
        sends = [
            (target or channel.default_exchange).publish(
                _message(body, message_id, headers(message_id) if headers else None, **properties),
                routing_key,
                mandatory=True,
            )
            for message_id, body in messages
        ]
        await asyncio.gather(*sends)
        return len(sends)
    finally:
        await connection.close()


def publish(
    url: str,
    exchange: str,
    routing_key: str,
    messages: Iterable[tuple[str, bytes]],
    **kwargs: Any,
) -> int:
    return asyncio.run(publish_async(url, exchange, routing_key, messages, **kwargs))


async def publish_many(url: str, routing_key: str, message_ids: list[str]) -> None:
    """One small JSON message per id to the queue ``routing_key`` (default exchange)."""
    await publish_async(url, "", routing_key, [(message_id, b"{}") for message_id in message_ids])


async def drain_async(url: str, queue: str, limit: int = 1000) -> list[AbstractIncomingMessage]:
    """Take every message of ``queue`` (up to ``limit``) with basic.get: the queue ends empty."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        taken: list[AbstractIncomingMessage] = []
        while len(taken) < limit:
            message = await source.get(no_ack=True, fail=False)
            if message is None:
                break
            taken.append(message)
        return taken
    finally:
        await connection.close()


def drain(url: str, queue: str) -> list[AbstractIncomingMessage]:
    return asyncio.run(drain_async(url, queue))


async def message_counts_async(url: str, queues: Iterable[str]) -> dict[str, int]:
    """Ready messages of each queue from a passive declare: exact for quorum queues too (the
    management API and rabbitmqctl report theirs as of the last tick), without the unacked."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        counts = {}
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            counts[name] = declared.declaration_result.message_count or 0
        return counts
    finally:
        await connection.close()


def message_counts(url: str, queues: Iterable[str]) -> dict[str, int]:
    return asyncio.run(message_counts_async(url, queues))


async def wait_ready(url: str, queue: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``queue`` holds at least ``count`` ready messages (a copy's confirm, a
    dead-lettering, or a closed channel's return reaches the queue a little later)."""

    async def reached() -> bool:
        return (await message_counts_async(url, [queue]))[queue] >= count

    await eventually(reached, f"{count} ready messages in {queue}", timeout)


def dead_letter_to(target: str) -> dict[str, Any]:
    """Queue arguments that dead-letter to the queue ``target`` (through the default exchange)."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target}


async def declare_topology(app: App, url: str) -> None:
    """Declare the app's topology the way ``rabbitflow topology declare`` does."""
    connection = await aio_pika.connect(url)
    async with connection:
        await declare(connection, derive(app.load_topology()))


async def return_until_dead_lettered(
    connection: aio_pika.abc.AbstractConnection, queue: str, rounds: int = 40
) -> None:
    """Take every message of ``queue`` and give it back by closing the channel, as a crashing
    worker would (each return counts toward ``x-delivery-limit`` on every version), until the
    queue stays empty: the broker dead-lettered them (or holds them, when their DLQ refuses)."""
    watcher = await connection.channel()
    for _ in range(rounds):
        taker = await connection.channel()
        source = await taker.get_queue(queue, ensure=False)
        got = 0
        while await source.get(no_ack=False, fail=False) is not None:
            got += 1
        await taker.close()
        if not got and await _stays_empty(watcher, queue):
            return


async def _stays_empty(channel: aio_pika.abc.AbstractChannel, queue: str) -> bool:
    """Nothing ready in ``queue`` for half a second: what a closed channel gave back is back
    (RabbitMQ returns it asynchronously), and what passed the delivery limit is gone."""
    for _ in range(2):
        await asyncio.sleep(0.25)
        declared = await channel.declare_queue(queue, passive=True)
        if declared.declaration_result.message_count:
            return False
    return True


def jobs(prefix: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` messages for the ``work`` queue, ids ``prefix-0`` ..."""
    return [(f"{prefix}-{i}", json.dumps({"n": i}).encode()) for i in range(count)]
