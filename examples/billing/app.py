"""Charge each order once, even when RabbitMQ delivers it twice.

Run it from the repository root with ``rabbitflow run examples.billing.app:app`` (Redis on
``REDIS_URL``, default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from pydantic import BaseModel

from rabbitflow import App
from rabbitflow.idempotency import RedisStore

log = structlog.get_logger("billing")

store = RedisStore(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    ttl="7d",  # a duplicate within a week is recognised (replays, producer retries)
    lease="2m",  # a crashed worker's claim blocks duplicates for at most this long
    prefix="billing:",
)
app = App(topology=Path(__file__).with_name("topology.toml"), idempotency=store, name="billing")


class OrderCreated(BaseModel):
    order_id: int
    amount: float


class PaymentProvider:
    """Stands for the payment API: the side effect that must not happen twice."""

    def __init__(self) -> None:
        self.charges: list[tuple[int, float]] = []

    async def charge(self, order_id: int, amount: float) -> None:
        self.charges.append((order_id, amount))


payments = PaymentProvider()


@app.consumer("billing.charges")  # idempotent = true in topology.toml
async def charge(order: OrderCreated) -> None:
    await payments.charge(order.order_id, order.amount)
    log.info("order charged", order_id=order.order_id, amount=order.amount)
