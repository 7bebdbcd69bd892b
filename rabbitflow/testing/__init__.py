"""Test rabbitflow handlers without a broker.

:class:`TestApp` runs an :class:`~rabbitflow.App`'s real consumer code (decode, handler,
outcome, retry tiers, dead-lettering) on :class:`MemoryBroker`, an in-memory RabbitMQ whose
TTLs run on a :class:`VirtualClock`::

    async with TestApp(app) as t:
        await t.publish("orders", "order.created", {"order_id": 1})
        await t.drain()
        assert t.dead_letters("billing.order-created") == []

The pytest plugin (``rabbitflow.testing.pytest_plugin``, registered as an entry point) adds
the ``rabbitflow_app`` fixture and fixtures for tests against a real RabbitMQ.
"""

from rabbitflow.testing._app import DrainError, Handled, TestApp
from rabbitflow.testing._broker import (
    MemoryBroker,
    MemoryChannel,
    MemoryConnection,
    MemoryExchange,
    MemoryQueue,
    PublishResult,
    StoredMessage,
)
from rabbitflow.testing._clock import VirtualClock

__all__ = [
    "DrainError",
    "Handled",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryConnection",
    "MemoryExchange",
    "MemoryQueue",
    "PublishResult",
    "StoredMessage",
    "TestApp",
    "VirtualClock",
]
