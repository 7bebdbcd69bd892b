"""The orders service: three consumers on the queues of the root ``topology.toml``.

Run it with ``rabbitflow run examples.orders.app:app`` from the repository root, and feed it
with ``python -m examples.orders.produce``.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from examples.orders.models import OrderCreated, OrderPaid
from rabbitflow import App, Message, Reject

app = App(topology="topology.toml", name="orders-service")
log = structlog.get_logger("orders")
invoices: dict[int, float] = {}


@app.consumer("billing.order-created")
async def bill(order: OrderCreated, message: Message) -> None:
    """Create the invoice; at-least-once delivery makes the message_id the idempotency key."""
    if order.customer == "blocked":
        raise Reject(f"customer of order {order.order_id} is blocked")
    invoices[order.order_id] = order.amount
    await app.publish(
        "orders",
        "order.paid",
        OrderPaid(order_id=order.order_id, amount=order.amount),
        correlation_id=message.message_id,
    )


@app.consumer("shipping.order-paid")
def ship(order: OrderPaid) -> None:
    """A blocking call (a carrier's SDK, say): sync handlers run in a thread pool."""
    time.sleep(0.001)
    log.info("label printed", order_id=order.order_id)


@app.consumer("audit.all")
async def audit(event: dict[str, Any], message: Message) -> None:
    """Every order event, whatever its shape."""
    log.debug("audited", routing_key=message.routing_key, keys=sorted(event))


@app.consumer("support.vip-orders")
async def vip(order: OrderCreated) -> None:
    log.info("vip order", order_id=order.order_id, customer=order.customer)
