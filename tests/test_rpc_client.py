"""``app.request()`` over direct reply-to against the real RabbitMQ.

The responder here is written by hand with aiormq and rabbitflow's :class:`Replier`, so the
caller's side is tested on its own: many requests in flight, timeouts, a lost connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from pydantic import BaseModel

from rabbitflow import (
    App,
    BrokerError,
    DecodeError,
    PublishError,
    RemoteError,
    RequestTimeout,
    UnroutableError,
)
from rabbitflow._publisher import Publisher
from rabbitflow._rpc import Replier
from tests.support.broker import Rabbit

pytestmark = pytest.mark.broker

QUEUE = "rpc.echo"


class Quote(BaseModel):
    sku: str
    price: float


class Other(BaseModel):
    name: int


Responder = Callable[[DeliveredMessage, Replier], Awaitable[None]]


async def serve(url: str, respond: Responder) -> AsyncIterator[aiormq.abc.AbstractConnection]:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.queue_declare(QUEUE, auto_delete=True)
    publisher = await Publisher.open(connection)
    replier = Replier(QUEUE, publisher)

    async def on_request(delivery: DeliveredMessage) -> None:
        await respond(delivery, replier)

    await channel.basic_consume(QUEUE, on_request, no_ack=True)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def vhost_url(rabbit: Rabbit) -> Iterator[str]:
    """One vhost for the module (each test serves its own auto-delete queue in it)."""
    with rabbit.vhost("rf-rpc") as name:
        yield rabbit.vhost_url(name)


async def echo(delivery: DeliveredMessage, replier: Replier) -> None:
    request = json.loads(delivery.body)
    # Later requests are answered first: replies arrive out of order.
    await asyncio.sleep(request.get("delay", 0))
    await replier.reply(delivery, {"echo": request["n"]})


async def test_a_hundred_requests_in_flight_each_get_their_own_reply(
    vhost_url: str, caller: App
) -> None:
    async for _ in serve(vhost_url, echo):
        calls = [
            caller.request("", QUEUE, {"n": n, "delay": (100 - n) / 1000}, timeout=10)
            for n in range(100)
        ]
        replies = await asyncio.gather(*calls)
        assert replies == [{"echo": n} for n in range(100)]
        assert caller.requests_in_flight == 0


async def test_a_reply_is_validated_into_the_response_model(vhost_url: str, caller: App) -> None:
    async def quote(delivery: DeliveredMessage, replier: Replier) -> None:
        await replier.reply(delivery, Quote(sku=json.loads(delivery.body)["sku"], price=9.5))

    async for _ in serve(vhost_url, quote):
        result = await caller.request("", QUEUE, {"sku": "A1"}, timeout=5, response_model=Quote)
        assert result == Quote(sku="A1", price=9.5)
        with pytest.raises(DecodeError, match="invalid Other"):
            await caller.request("", QUEUE, {"sku": "A1"}, timeout=5, response_model=Other)


async def test_text_and_bytes_replies_come_back_by_content_type(
    vhost_url: str, caller: App
) -> None:
    async def typed(delivery: DeliveredMessage, replier: Replier) -> None:
        value: Any = "plain" if delivery.body == b"text" else b"\x00\x01"
        await replier.reply(delivery, value)

    async for _ in serve(vhost_url, typed):
        assert await caller.request("", QUEUE, "text", timeout=5) == "plain"
        assert await caller.request("", QUEUE, "bytes", timeout=5) == b"\x00\x01"


async def test_a_failed_handler_reaches_the_caller_as_remote_error(
    vhost_url: str, caller: App
) -> None:
    async def failing(delivery: DeliveredMessage, replier: Replier) -> None:
        await replier.reply_error(delivery, LookupError("no price for sku A1"))

    async for _ in serve(vhost_url, failing):
        with pytest.raises(RemoteError) as caught:
            await caller.request("", QUEUE, {"sku": "A1"}, timeout=5)
        assert caught.value.type == "LookupError"
        assert caught.value.message == "no price for sku A1"


async def test_no_reply_in_time_raises_request_timeout_and_forgets_the_request(
    vhost_url: str, caller: App
) -> None:
    async def silent(delivery: DeliveredMessage, replier: Replier) -> None:
        return None

    async for _ in serve(vhost_url, silent):
        started = asyncio.get_running_loop().time()
        with pytest.raises(RequestTimeout) as caught:
            await caller.request("", QUEUE, {"n": 1}, timeout=0.3)
        assert 0.3 <= asyncio.get_running_loop().time() - started < 2
        assert caught.value.routing_key == QUEUE
        assert caller.requests_in_flight == 0


async def test_a_late_reply_after_a_timeout_is_dropped_and_later_requests_work(
    vhost_url: str, caller: App
) -> None:
    async def slow_first(delivery: DeliveredMessage, replier: Replier) -> None:
        request = json.loads(delivery.body)
        await asyncio.sleep(0.5 if request["n"] == 1 else 0)
        await replier.reply(delivery, request["n"])

    async for _ in serve(vhost_url, slow_first):
        with pytest.raises(RequestTimeout):
            await caller.request("", QUEUE, {"n": 1}, timeout=0.2)
        await asyncio.sleep(0.5)  # the late reply arrives and is dropped
        assert await caller.request("", QUEUE, {"n": 2}, timeout=5) == 2


async def test_requests_in_flight_fail_fast_when_the_connection_is_lost(
    vhost_url: str, caller: App
) -> None:
    async def silent(delivery: DeliveredMessage, replier: Replier) -> None:
        return None

    async for _ in serve(vhost_url, silent):
        calls = [
            asyncio.ensure_future(caller.request("", QUEUE, {"n": n}, timeout=30)) for n in range(5)
        ]
        await asyncio.sleep(0.2)
        assert caller._connection is not None
        await caller._connection.close()
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert asyncio.get_running_loop().time() - started < 2
        assert all(isinstance(result, BrokerError) for result in results), results
        assert "reply channel was closed" in str(results[0])
        # The next request opens a new connection and a new reply consumer.
        with pytest.raises(RequestTimeout):
            await caller.request("", QUEUE, {"n": 9}, timeout=0.2)


async def test_a_request_no_queue_takes_fails_at_once(caller: App) -> None:
    with pytest.raises(UnroutableError):
        await caller.request("", "nobody.listens", {"n": 1}, timeout=5)


async def test_a_request_to_a_missing_exchange_fails_clearly_and_the_next_one_works(
    vhost_url: str, caller: App
) -> None:
    async for _ in serve(vhost_url, echo):
        with pytest.raises(PublishError, match="no exchange 'nowhere'"):
            await caller.request("nowhere", "x", {"n": 1}, timeout=5)
        # RabbitMQ closed that channel (404); the next request gets a new reply consumer.
        assert await caller.request("", QUEUE, {"n": 7}, timeout=5) == {"echo": 7}
