"""One class for "not published": every way ``publish``, ``publish_many`` / ``app.batch()`` and
``request`` can fail to hand a message to the broker is a ``PublishError``, and a failure to
connect stays the ``BrokerError`` it was (``UnreachableBrokerError``, ``AccessRefusedError``),
so code written either way keeps catching it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from rabbitflow import (
    AccessRefusedError,
    App,
    BrokerError,
    PublishAccessRefusedError,
    PublishConnectionError,
    PublishError,
    PublishUnreachableError,
    UnreachableBrokerError,
)
from tests.support.network import free_port


@pytest.fixture
async def down() -> AsyncIterator[App]:
    """An app whose broker is down: nothing listens on its port."""
    app = App(url=f"amqp://app:s3cret-pw@127.0.0.1:{free_port()}/")
    yield app
    await app.close()


def assert_not_published(error: PublishError, exchange: str, routing_key: str) -> None:
    # The publish error's data, the broker error's data, and never the password.
    assert (error.exchange, error.routing_key, error.missing) == (exchange, routing_key, False)
    assert isinstance(error, PublishUnreachableError)
    assert isinstance(error, UnreachableBrokerError)
    assert error.doing == "connecting"
    assert error.url.startswith("amqp://app:***@127.0.0.1:")
    assert str(error).startswith(
        f"publish to exchange {exchange!r} with routing key {routing_key!r} failed: "
        "cannot connect to amqp://app:***@127.0.0.1:"
    )
    assert "s3cret-pw" not in str(error)


async def test_publish_with_the_broker_down_is_a_publish_error(down: App) -> None:
    with pytest.raises(PublishError) as caught:
        await down.publish("orders", "order.created", {"order_id": 1})
    assert_not_published(caught.value, "orders", "order.created")


async def test_code_that_catches_the_broker_error_still_catches_it(down: App) -> None:
    # Written before publish raised a PublishError for this: the same except clauses hold.
    with pytest.raises(UnreachableBrokerError):
        await down.publish("orders", "order.created", {"order_id": 1})
    with pytest.raises(BrokerError):
        await down.publish("orders", "order.created", {"order_id": 1})


async def test_publish_many_and_batches_with_the_broker_down(down: App) -> None:
    with pytest.raises(PublishError) as caught:
        await down.publish_many("orders", "order.created", [{"order_id": 1}, {"order_id": 2}])
    assert_not_published(caught.value, "orders", "order.created")

    batch = down.batch()
    batch.publish("audit", "entry", "first")
    batch.publish("orders", "order.created", {"order_id": 3})
    with pytest.raises(PublishConnectionError) as in_block:
        await batch.send()
    assert_not_published(in_block.value, "audit", "entry")


async def test_a_request_that_cannot_be_sent(down: App) -> None:
    with pytest.raises(PublishError) as caught:
        await down.request("rpc", "price.quote", {"sku": "A1"}, timeout=5)
    assert_not_published(caught.value, "rpc", "price.quote")


@pytest.mark.broker
async def test_a_refused_login_is_a_publish_error_and_an_access_refusal(vhost_url: str) -> None:
    parts = urlsplit(vhost_url)
    netloc = f"{parts.username}:not-the-password@{parts.hostname}:{parts.port}"
    wrong = parts._replace(netloc=netloc)
    app = App(url=urlunsplit(wrong))
    try:
        with pytest.raises(PublishError) as caught:
            await app.publish("orders", "order.created", {"order_id": 1})
    finally:
        await app.close()
    assert isinstance(caught.value, PublishAccessRefusedError)
    assert isinstance(caught.value, AccessRefusedError)
    assert "not-the-password" not in str(caught.value)


@pytest.mark.broker
async def test_once_the_broker_is_back_the_same_app_publishes(vhost_url: str) -> None:
    # The failure left nothing behind: the next publish connects (here to a live broker).
    port = free_port()
    parts = urlsplit(vhost_url)
    app = App(url=urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{port}")))
    try:
        with pytest.raises(PublishError):
            await app.publish("", "nowhere", "x", mandatory=False)
        app.url = vhost_url
        assert await app.publish("", "nowhere", "x", mandatory=False)
    finally:
        await app.close()
