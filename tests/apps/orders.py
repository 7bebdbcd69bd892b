"""The orders service of ``examples/orders`` on the root ``topology.toml``, recording each run.

Records ``billing <order_id>``, ``shipping <order_id>``, ``audit <routing_key> <order_id>`` and
``vip <order_id>``; billing publishes ``order.paid`` like the example does.
"""

from __future__ import annotations

from typing import Any

from examples.orders.models import OrderCreated, OrderPaid
from rabbitflow import App, Message
from tests.apps.recording import record

app = App(topology="topology.toml", name="orders-test")


@app.consumer("billing.order-created")
async def bill(order: OrderCreated, message: Message) -> None:
    paid = OrderPaid(order_id=order.order_id, amount=order.amount)
    await app.publish("orders", "order.paid", paid, correlation_id=message.message_id)
    record("billing", order.order_id)


@app.consumer("shipping.order-paid")
def ship(order: OrderPaid) -> None:
    record("shipping", order.order_id)


@app.consumer("audit.all")
async def audit(event: dict[str, Any], message: Message) -> None:
    record("audit", message.routing_key, event["order_id"])


@app.consumer("support.vip-orders")
async def vip(order: OrderCreated) -> None:
    record("vip", order.order_id)
