"""TestApp runs an app's real consumer code on the in-memory broker; the plugin's fixtures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import pytest
from pydantic import BaseModel

from rabbitflow import App, Message, Reject, Retry, UnroutableError
from rabbitflow.testing import DrainError, TestApp
from rabbitflow.testing.pytest_plugin import choose_source, in_ci, unavailable
from rabbitflow.topology import Topology, parse_topology

TOPOLOGY = """
[exchanges.orders]
type = "topic"

[queues.billing]
bindings = [{ exchange = "orders", routing_key = "order.created" }]
retry = { delays = ["1s", "10s"], max_attempts = 3 }

[queues.shipping]
queue_type = "classic"
bindings = [{ exchange = "orders", routing_key = "order.paid" }]
retry = false
"""


class Order(BaseModel):
    order_id: int
    amount: float = 1.0


def orders_topology(extra: str = "") -> Topology:
    return parse_topology(TOPOLOGY + extra)


async def test_a_failing_handler_is_retried_through_the_tiers_on_virtual_time() -> None:
    app = App()
    failures = {1: 2}

    @app.consumer("billing")
    async def bill(order: Order) -> None:
        if failures.get(order.order_id, 0):
            failures[order.order_id] -= 1
            raise ConnectionError("payment service down")

    async with TestApp(app, orders_topology()) as t:
        await t.publish("orders", "order.created", Order(order_id=1))
        started = asyncio.get_running_loop().time()
        await t.drain()

        assert [(h.payload.order_id, h.attempt) for h in t.handled("billing")] == [
            (1, 1),
            (1, 2),
            (1, 3),
        ]
        assert [type(h.error) for h in t.handled("billing")] == [
            ConnectionError,
            ConnectionError,
            type(None),
        ]
        assert t.dead_letters("billing") == []
        assert t.clock.now_ms() == 1_000 + 10_000  # waited in the 1s tier, then the 10s tier
        assert asyncio.get_running_loop().time() - started < 5


async def test_exhausted_retries_dead_letter_with_the_contract_headers() -> None:
    app = App()

    @app.consumer("billing")
    async def bill(order: Order, message: Message) -> None:
        raise ValueError(f"cannot bill order {order.order_id}")

    async with TestApp(app, orders_topology()) as t:
        await t.publish("orders", "order.created", Order(order_id=7), headers={"tenant": "acme"})
        await t.drain()

        (dead,) = t.dead_letters("billing")
        assert dead.json() == {"order_id": 7, "amount": 1.0}
        assert dead.headers["tenant"] == "acme"
        assert dead.headers["rabbitflow-attempt"] == 3
        assert dead.headers["rabbitflow-origin-queue"] == "billing"
        assert dead.headers["rabbitflow-origin-exchange"] == "orders"
        assert dead.headers["rabbitflow-origin-routing-key"] == "order.created"
        assert dead.headers["rabbitflow-error-type"] == "ValueError"
        assert dead.headers["rabbitflow-error-message"] == "cannot bill order 7"
        assert "ValueError" in dead.headers["rabbitflow-error-stack"]
        assert len(t.handled("billing")) == 3


async def test_reject_and_undecodable_payloads_go_to_the_dlq_at_once() -> None:
    app = App()

    @app.consumer("billing")
    async def bill(order: Order) -> None:
        if order.amount < 0:
            raise Reject("negative amount")

    async with TestApp(app, orders_topology()) as t:
        await t.publish("orders", "order.created", Order(order_id=1, amount=-5))
        await t.publish("orders", "order.created", {"order_id": "not a number"})
        await t.drain()

        errors = [m.headers["rabbitflow-error-type"] for m in t.dead_letters("billing")]
        assert errors == ["rabbitflow.errors.Reject", "rabbitflow.errors.DecodeError"]
        assert t.clock.now_ms() == 0  # nothing waited in a retry tier
        assert len(t.handled("billing")) == 1  # the undecodable one never reached the handler


async def test_retry_with_a_delay_beyond_the_largest_tier_waits_that_long() -> None:
    app = App()

    @app.consumer("billing")
    async def bill(order: Order, message: Message) -> None:
        if message.attempt == 1:
            raise Retry(delay="2m")  # e.g. a 429 with Retry-After: 120

    async with TestApp(app, orders_topology()) as t:
        await t.publish("orders", "order.created", Order(order_id=1))
        await t.drain()

        assert [h.attempt for h in t.handled("billing")] == [1, 2]
        assert t.clock.now_ms() >= 120_000


async def test_advance_releases_retries_only_when_their_delay_has_passed() -> None:
    app = App()

    @app.consumer("billing")
    async def bill(order: Order, message: Message) -> None:
        if message.attempt == 1:
            raise TimeoutError("slow downstream")

    async with TestApp(app, orders_topology()) as t:
        await t.publish("orders", "order.created", Order(order_id=1))
        await t.advance("999ms")
        assert [h.attempt for h in t.handled("billing")] == [1]
        assert len(t.queue("billing.retry.1s").messages) == 1

        await t.advance("1ms")
        assert [h.attempt for h in t.handled("billing")] == [1, 2]
        assert t.queue("billing.retry.1s").messages == []


async def test_handlers_publish_to_the_in_memory_broker() -> None:
    app = App()
    shipped: list[int] = []

    @app.consumer("billing")
    async def bill(order: Order) -> None:
        await app.publish("orders", "order.paid", order)

    @app.consumer("shipping")
    def ship(order: Order) -> None:  # a sync handler
        shipped.append(order.order_id)

    async with TestApp(app, orders_topology()) as t:
        for order_id in range(5):
            await t.publish("orders", "order.created", Order(order_id=order_id))
        await t.drain()

    assert shipped == [0, 1, 2, 3, 4]


async def test_handler_timeouts_are_retried() -> None:
    app = App()

    @app.consumer("billing")
    async def bill(order: Order, message: Message) -> None:
        if message.attempt == 1:
            await asyncio.sleep(5)

    topology = parse_topology(
        TOPOLOGY.replace("[queues.billing]\n", '[queues.billing]\ntimeout = "50ms"\n')
    )
    async with TestApp(app, topology) as t:
        await t.publish("orders", "order.created", Order(order_id=1))
        await t.drain()
        assert [h.attempt for h in t.handled("billing")] == [1, 2]
        assert t.dead_letters("billing") == []


@pytest.mark.parametrize(("threads", "on_loop_thread"), [(False, True), (True, False)])
async def test_sync_handlers_run_inline_unless_threads_are_asked_for(
    threads: bool, on_loop_thread: bool
) -> None:
    app = App()
    seen: list[bool] = []

    @app.consumer("shipping")
    def ship(order: Order) -> None:
        seen.append(threading.current_thread() is threading.main_thread())

    async with TestApp(app, orders_topology(), threads=threads) as t:
        await t.publish("orders", "order.paid", Order(order_id=1))
        await t.drain()
    assert seen == [on_loop_thread]


async def test_publishing_with_no_queue_bound_raises() -> None:
    async with TestApp(App(), orders_topology()) as t:
        with pytest.raises(UnroutableError):
            await t.publish("orders", "invoice.sent", {"id": 1})


async def test_drain_reports_a_handler_that_does_not_finish() -> None:
    app = App()

    @app.consumer("shipping")
    async def ship(order: Order) -> None:
        await asyncio.Event().wait()

    async with TestApp(app, orders_topology(), timeout=0.2) as t:
        await t.publish("orders", "order.paid", Order(order_id=1))
        with pytest.raises(DrainError, match="handlers still running"):
            await t.drain()


async def test_lifespan_hooks_run_around_the_test() -> None:
    events: list[str] = []
    app = App()
    app.on_startup(lambda: events.append("started"))
    app.on_shutdown(lambda: events.append("stopped"))

    async with TestApp(app, orders_topology()):
        assert events == ["started"]
    assert events == ["started", "stopped"]


async def test_the_app_topology_file_is_used_by_default(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    app = App(topology=path)

    async with TestApp(app) as t:
        assert "billing.retry.10s" in t.broker.queues
        assert t.queue("shipping").arguments["x-queue-type"] == "classic"


async def test_a_handler_for_an_undeclared_queue_is_refused() -> None:
    app = App()

    @app.consumer("biling")
    async def bill(order: Order) -> None: ...

    with pytest.raises(Exception, match='did you mean "billing"'):
        async with TestApp(app, orders_topology()):
            pass


# -- the pytest plugin ---------------------------------------------------------------------


async def test_rabbitflow_app_fixture_gives_an_entered_testapp(
    rabbitflow_app: Callable[..., Awaitable[TestApp]],
) -> None:
    app = App()
    seen: list[int] = []

    @app.consumer("shipping")
    async def ship(order: Order) -> None:
        seen.append(order.order_id)

    t = await rabbitflow_app(app, orders_topology())
    await t.publish("orders", "order.paid", Order(order_id=3))
    await t.drain()
    assert seen == [3]


@pytest.mark.parametrize(
    ("environ", "local", "docker", "expected"),
    [
        ({"RABBITFLOW_TEST_URL": "amqp://x/"}, True, True, "env"),
        ({}, True, True, "local"),
        ({}, False, True, "docker"),
        ({}, False, False, None),
    ],
)
def test_the_real_broker_is_looked_for_in_order(
    environ: dict[str, str], local: bool, docker: bool, expected: str | None
) -> None:
    assert choose_source(environ, lambda: local, lambda: docker) == expected


def test_a_missing_broker_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        unavailable("no broker")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        unavailable("no broker")
    assert not in_ci({"CI": "false"})


@pytest.mark.broker
async def test_rabbitmq_vhost_url_is_an_isolated_vhost(
    rabbitmq_url: str, rabbitmq_vhost: str, rabbitmq_vhost_url: str
) -> None:
    assert rabbitmq_vhost_url.endswith("/" + rabbitmq_vhost)
    connection = await aio_pika.connect(rabbitmq_vhost_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("only-here")
        assert queue.name == "only-here"
    other = await aio_pika.connect(rabbitmq_url)
    async with other:
        channel = await other.channel()
        with pytest.raises(Exception, match="NOT_FOUND"):
            await channel.declare_queue("only-here", passive=True)
