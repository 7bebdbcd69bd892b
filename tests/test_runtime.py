"""The consumer runtime in-process: a :class:`Worker` on a real broker, one vhost per test.

Handler signatures and decoding, undecodable payloads, sync handlers, the concurrency cap,
lifespan hooks and ``app.publish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pydantic import BaseModel

from rabbitflow import App, Message, PublishError, UnroutableError
from rabbitflow._worker import Worker, WorkerOptions
from tests.support.amqp import drain_async, message_counts_async
from tests.support.broker import Rabbit, worker_connections
from tests.support.waiting import eventually, wait_for, wait_until
from tests.support.worker import running

pytestmark = pytest.mark.broker


class Order(BaseModel):
    order_id: int
    amount: float


def topology(tmp_path: Path, *queues: str, settings: str = "") -> Path:
    """Classic queues bound to the direct exchange ``in`` with their own name as routing key."""
    lines = ['[defaults]\nqueue_type = "classic"\nretry = { delays = ["1s"] }\n', settings]
    lines.append('[exchanges.in]\ntype = "direct"\n')
    for queue in queues:
        lines.append(
            f'[queues."{queue}"]\nbindings = [{{ exchange = "in", routing_key = "{queue}" }}]\n'
        )
    path = tmp_path / "topology.toml"
    path.write_text("\n".join(lines))
    return path


# -- handler signatures ------------------------------------------------------------------------


async def test_each_handler_signature_gets_its_payload(tmp_path: Path, vhost_url: str) -> None:
    # Given one handler per supported signature
    queues = ("model", "dict", "str", "bytes", "message", "model-and-message")
    app = App(topology=topology(tmp_path, *queues))
    got: dict[str, tuple[Any, ...]] = {}

    @app.consumer("model")
    async def model(order: Order) -> None:
        got["model"] = (order,)

    @app.consumer("dict")
    async def as_dict(body: dict[str, Any]) -> None:
        got["dict"] = (body,)

    @app.consumer("str")
    async def as_str(text: str) -> None:
        got["str"] = (text,)

    @app.consumer("bytes")
    async def as_bytes(raw: bytes) -> None:
        got["bytes"] = (raw,)

    @app.consumer("message")
    async def message_only(message: Message) -> None:
        got["message"] = (message,)

    @app.consumer("model-and-message")
    async def both(order: Order, message: Message) -> None:
        got["model-and-message"] = (order, message)

    # When each gets a message
    async with running(app, vhost_url):
        await app.publish("in", "model", Order(order_id=1, amount=9.5))
        await app.publish("in", "dict", {"items": [1, 2]})
        await app.publish("in", "str", "héllo")
        await app.publish("in", "bytes", b"\x00\xff")
        await app.publish(
            "in",
            "message",
            {"x": 1},
            headers={"tenant": "acme"},
            message_id="m-1",
            correlation_id="c-1",
        )
        await app.publish("in", "model-and-message", Order(order_id=2, amount=1), message_id="m-2")
        await wait_for(lambda: len(got) == len(queues), "every handler to run")

    # Then each received its payload decoded as its signature asks
    assert got["model"] == (Order(order_id=1, amount=9.5),)
    assert got["dict"] == ({"items": [1, 2]},)
    assert got["str"] == ("héllo",)
    assert got["bytes"] == (b"\x00\xff",)
    (message,) = got["message"]
    assert isinstance(message, Message)
    assert message.body == b'{"x":1}'
    assert message.headers["tenant"] == "acme"
    assert (message.message_id, message.correlation_id) == ("m-1", "c-1")
    assert (message.exchange, message.routing_key, message.queue) == ("in", "message", "message")
    assert (message.redelivered, message.attempt) == (False, 1)
    order, message = got["model-and-message"]
    assert order == Order(order_id=2, amount=1)
    assert (message.message_id, message.queue) == ("m-2", "model-and-message")


async def test_undecodable_payloads_go_to_the_dlq_at_once(tmp_path: Path, vhost_url: str) -> None:
    # Given a handler expecting an Order on a queue with retries
    app = App(topology=topology(tmp_path, "orders"))
    handled: list[Order] = []

    @app.consumer("orders")
    async def handle(order: Order) -> None:
        handled.append(order)

    # When it gets invalid JSON, JSON failing validation and a text body, then a good order
    async with running(app, vhost_url):
        await app.publish("in", "orders", b"{not json", content_type="application/json")
        await app.publish("in", "orders", {"order_id": "abc", "amount": 1})
        await app.publish("in", "orders", "hello")
        await app.publish("in", "orders", Order(order_id=7, amount=1))
        await wait_for(lambda: bool(handled), "the good order")

        async def dead_lettered() -> bool:
            counts = await message_counts_async(vhost_url, ["orders.dlq"])
            return counts["orders.dlq"] == 3

        await eventually(dead_lettered, "three messages in the DLQ")

    # Then the handler saw only the good order; the others are in the DLQ, never retried
    assert handled == [Order(order_id=7, amount=1)]
    assert await message_counts_async(vhost_url, ["orders", "orders.retry.1s"]) == {
        "orders": 0,
        "orders.retry.1s": 0,
    }
    dead = await drain_async(vhost_url, "orders.dlq")
    assert len(dead) == 3
    for message in dead:
        headers = message.headers
        assert headers["rabbitflow-error-type"] == "rabbitflow.errors.DecodeError"
        assert headers["rabbitflow-origin-queue"] == "orders"
        assert headers["rabbitflow-attempt"] == 1
        assert not message.redelivered
    reasons = [str(message.headers["rabbitflow-error-message"]) for message in dead]
    assert "Invalid JSON" in reasons[0]
    assert "order_id" in reasons[1]
    assert "text/plain" in reasons[2]


# -- execution -----------------------------------------------------------------------------------


async def test_sync_handler_runs_in_a_thread_and_the_loop_stays_responsive(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a sync handler that blocks for one second
    app = App(topology=topology(tmp_path, "blocking"))
    threads: list[str] = []

    @app.consumer("blocking")
    def handle(body: dict[str, Any]) -> None:
        threads.append(threading.current_thread().name)
        time.sleep(1.0)
        threads.append("done")

    # When it runs, while the event loop is watched
    gaps: list[float] = []
    async with running(app, vhost_url):
        await app.publish("in", "blocking", {"n": 1})
        await wait_for(lambda: bool(threads), "the handler to start")
        last = time.monotonic()
        while "done" not in threads:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    # Then it ran off the event loop thread, which kept running meanwhile
    assert threads[0] != threading.current_thread().name
    assert threads[0].startswith("rabbitflow-handler")
    assert len(gaps) > 10
    assert max(gaps) < 0.5, max(gaps)  # the handler blocks for 1 s
    assert await message_counts_async(vhost_url, ["blocking"]) == {"blocking": 0}


async def test_concurrency_caps_handlers_running_at_once(tmp_path: Path, vhost_url: str) -> None:
    # Given prefetch 10 but concurrency 2
    path = topology(tmp_path, "capped")
    path.write_text(path.read_text() + "prefetch = 10\nconcurrency = 2\n")
    app = App(topology=path)
    active = 0
    peak = 0
    done = 0

    @app.consumer("capped")
    async def handle(body: dict[str, Any]) -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.1)
        active -= 1
        done += 1

    # When ten messages are waiting
    async with running(app, vhost_url):
        for n in range(10):
            await app.publish("in", "capped", {"n": n})
        await wait_for(lambda: done == 10, "every message")

    # Then exactly two handlers ran at a time
    assert peak == 2


async def test_hooks_and_lifespan_run_in_order_around_consuming(
    tmp_path: Path, vhost_url: str
) -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        events.append("lifespan enter")
        yield
        events.append("lifespan exit")

    app = App(topology=topology(tmp_path, "hooks"), lifespan=lifespan)

    @app.on_startup
    async def first() -> None:
        # The broker connection is open: start-up hooks can publish.
        await app.publish("in", "hooks", {"from": "startup"})
        events.append("startup 1")

    @app.on_startup
    async def second() -> None:
        await asyncio.sleep(0.2)  # consuming must not start before this returns
        events.append("startup 2")

    @app.on_shutdown
    def third() -> None:  # sync hooks work too
        events.append("shutdown 1")

    @app.on_shutdown
    async def fourth() -> None:
        events.append("shutdown 2")

    @app.consumer("hooks")
    async def handle(body: dict[str, Any]) -> None:
        await asyncio.sleep(0.2)  # still running when stop() is called
        events.append(f"handled {body['from']}")

    async with running(app, vhost_url):
        await wait_for(lambda: "startup 2" in events, "the start-up hooks")
        await asyncio.sleep(0.05)

    assert events == [
        "lifespan enter",
        "startup 1",
        "startup 2",
        "handled startup",
        "shutdown 1",
        "shutdown 2",
        "lifespan exit",
    ]


async def test_shutdown_hooks_publish_to_the_broker_the_worker_consumes_from(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given an app with no URL of its own, run against the test vhost, and a shutdown hook
    # that announces the stop (the worker's own connection is closed by then)
    app = App(topology=topology(tmp_path, "announcements"))

    @app.on_shutdown
    async def announce() -> None:
        await app.publish("in", "announcements", {"worker": "stopped"})

    @app.consumer("announcements")
    async def ignore(body: bytes) -> None: ...

    async with running(app, vhost_url, shutdown_timeout=0):
        pass

    # Then the announcement reached that vhost, not the default URL's
    (announcement,) = await drain_async(vhost_url, "announcements")
    assert announcement.body == b'{"worker":"stopped"}'


async def test_a_failing_startup_hook_fails_the_run(
    tmp_path: Path, rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    app = App(topology=topology(tmp_path, "never"))
    handled: list[object] = []

    @app.on_startup
    async def connect_database() -> None:
        await app.publish("in", "never", {"n": 1})
        raise RuntimeError("database unreachable")

    @app.consumer("never")
    async def handle(body: dict[str, Any]) -> None:
        handled.append(body)

    worker = Worker(app, app.load_topology(), WorkerOptions(url=vhost_url))
    with pytest.raises(RuntimeError, match="database unreachable"):
        await asyncio.wait_for(worker.run(), 15)

    # Nothing was consumed, and the worker closed its connection
    assert handled == []
    assert await message_counts_async(vhost_url, ["never"]) == {"never": 1}
    await asyncio.to_thread(
        wait_until, lambda: not worker_connections(rabbit, vhost), 10, "the connection to close"
    )


# -- publishing ----------------------------------------------------------------------------------


async def test_app_publish_raises_unroutable_and_keeps_working(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given an exchange with one bound queue
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("in", aio_pika.ExchangeType.DIRECT)
        queue = await channel.declare_queue("bound")
        await queue.bind(exchange, "bound")

    async with App(topology=tmp_path / "absent.toml", url=vhost_url) as app:
        # When a message matches no binding, Then publish raises UnroutableError
        with pytest.raises(UnroutableError) as raised:
            await app.publish("in", "nowhere", {"n": 1})
        assert (raised.value.exchange, raised.value.routing_key) == ("in", "nowhere")
        # and a missing exchange is a PublishError
        with pytest.raises(PublishError):
            await app.publish("no-such-exchange", "bound", {"n": 2})
        # and the app still publishes afterwards
        message_id = await app.publish("in", "bound", {"n": 3}, message_id="after")

    assert message_id == "after"
    (received,) = await drain_async(vhost_url, "bound")
    assert (received.body, received.message_id) == (b'{"n":3}', "after")
