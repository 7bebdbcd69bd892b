"""Idempotent consumers (contract section 8) through the real dispatcher, on ``TestApp``."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from pamqp import commands as spec

from rabbitflow import App, ConfigurationError, Message
from rabbitflow.idempotency import MemoryStore
from rabbitflow.testing import TestApp
from rabbitflow.topology import parse_topology

TOPOLOGY = """
[exchanges.orders]
type = "topic"

[queues.billing]
bindings = [{ exchange = "orders", routing_key = "order.created" }]
retry = { delays = ["1s", "10s"], max_attempts = 4 }
prefetch = 10
"""


def billing_app(store: MemoryStore, *, idempotent: bool | None = True) -> tuple[App, list[str]]:
    app = App(idempotency=store)
    charged: list[str] = []

    @app.consumer("billing", idempotent=idempotent)
    async def bill(order: dict[str, int], message: Message) -> None:
        charged.append(message.message_id or "-")

    return app, charged


async def test_a_duplicate_message_id_is_acked_without_running_the_handler() -> None:
    app, charged = billing_app(MemoryStore())
    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        for _ in range(3):
            await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await t.publish("orders", "order.created", {"order_id": 2}, message_id="order-2")
        await t.drain()

        assert charged == ["order-1", "order-2"]
        assert len(t.queue("billing")) == 0
        assert t.dead_letters("billing") == []
        assert t.metrics.consumed.labels("billing", "ack").value == 4


async def test_idempotent_true_in_the_topology_file_turns_the_check_on() -> None:
    app, charged = billing_app(MemoryStore(), idempotent=None)
    topology = parse_topology(TOPOLOGY + "idempotent = true\n")
    async with TestApp(app, topology) as t:
        for _ in range(2):
            await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await t.drain()
        assert charged == ["order-1"]


async def test_without_the_flag_duplicates_run_again() -> None:
    app, charged = billing_app(MemoryStore(), idempotent=None)
    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        for _ in range(2):
            await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await t.drain()
        assert charged == ["order-1", "order-1"]


async def test_a_delivery_without_message_id_is_processed_and_counted() -> None:
    app, charged = billing_app(MemoryStore())
    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                t.broker.publish(
                    "orders",
                    "order.created",
                    b'{"order_id": 1}',
                    spec.Basic.Properties(content_type="application/json"),
                )
            await t.drain()
        assert charged == ["-", "-"]
        warnings = [e for e in logs if "without message_id" in e["event"]]
        assert warnings[0]["count"] == 1


async def test_a_failed_run_releases_its_claim_so_the_retry_runs() -> None:
    app = App(idempotency=MemoryStore())
    runs: list[int] = []

    @app.consumer("billing", idempotent=True)
    async def bill(order: dict[str, int], message: Message) -> None:
        runs.append(message.attempt)
        if message.attempt < 3:
            raise ConnectionError("payment provider down")

    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await t.drain()
        # Now done: a late duplicate does not charge again.
        await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await t.drain()

    assert runs == [1, 2, 3]


async def test_a_copy_arriving_while_the_first_runs_waits_instead_of_running_in_parallel() -> None:
    app = App(idempotency=MemoryStore(lease="30s"))
    release = asyncio.Event()
    running: list[str] = []
    finished: list[str] = []

    @app.consumer("billing", idempotent=True)
    async def bill(order: dict[str, int], message: Message) -> None:
        running.append(message.message_id or "-")
        await release.wait()
        finished.append(message.message_id or "-")

    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await asyncio.sleep(0.01)
        await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await asyncio.sleep(0.01)
        # The second copy found the claim busy: it went to a retry tier, it did not run.
        assert running == ["order-1"]
        assert len(t.queue("billing.retry.1s")) + len(t.queue("billing.retry.10s")) == 1
        release.set()
        await t.drain()

        assert finished == ["order-1"]
        assert t.dead_letters("billing") == []
        assert len(t.queue("billing")) == 0


async def test_a_claim_left_by_a_dead_process_expires_and_the_redelivery_runs() -> None:
    store = MemoryStore(lease="20s")
    # A process claimed order-1 and died before finishing (its claim was never released).
    await store.claim("billing:order-1", "dead-process", store.lease_ms)
    app, charged = billing_app(store)

    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        await t.publish("orders", "order.created", {"order_id": 1}, message_id="order-1")
        await t.drain()  # busy → a retry no earlier than the lease's end, on virtual time

        assert charged == ["order-1"]
        assert t.dead_letters("billing") == []


def test_an_idempotent_handler_needs_a_store() -> None:
    app = App()

    @app.consumer("billing", idempotent=True)
    async def bill(order: dict[str, int]) -> None: ...

    with pytest.raises(ConfigurationError, match=r"idempotent.*App\(\.\.\., idempotency="):
        app.check_handlers(parse_topology(TOPOLOGY))
