"""The billing example on ``TestApp`` with its real store: Redis (``RABBITFLOW_TEST_REDIS``)."""

from __future__ import annotations

import uuid

import pytest

from examples.billing import app as billing
from rabbitflow.testing import TestApp
from tests.support.services import delete_prefix, require_redis


async def test_the_billing_example_charges_each_order_once(monkeypatch: pytest.MonkeyPatch) -> None:
    redis_url = require_redis()
    prefix = f"rf-test:{uuid.uuid4().hex[:10]}:"
    monkeypatch.setattr(billing.store, "prefix", prefix)
    monkeypatch.setattr(billing, "payments", billing.PaymentProvider())
    try:
        async with TestApp(billing.app) as t:
            for order_id in (1, 1, 2, 1):
                await t.publish(
                    "orders",
                    "order.created",
                    billing.OrderCreated(order_id=order_id, amount=9.5),
                    message_id=f"order-{order_id}",
                )
            await t.drain()
            assert sorted(billing.payments.charges) == [(1, 9.5), (2, 9.5)]
            assert len(t.queue("billing.charges")) == 0
            assert t.dead_letters("billing.charges") == []
    finally:
        await delete_prefix(redis_url, prefix)
