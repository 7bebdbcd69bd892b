"""What a RabbitMQ release does where releases differ: the figures behind docs/operations.md
("RabbitMQ versions"), docs/topology.md (consumer_timeout) and docs/recoverability.md (native
delayed retry).

    python scripts/broker_behaviour.py arguments      --port 5691
    python scripts/broker_behaviour.py consumer-timeout --port 5690   # ~65 s before 4.3
    python scripts/broker_behaviour.py delayed-retry  --port 5691      # 4.3+

Each run works in a vhost of its own (made and deleted through the management API on
port + 10000, user guest) and prints one line per observation.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

Probe = Callable[[AbstractChannel], Awaitable[Any]]


class Broker:
    def __init__(self, port: int) -> None:
        self.port = port
        self.vhost = f"behaviour-{uuid.uuid4().hex[:6]}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        token = base64.b64encode(b"guest:guest").decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port + 10000}/api/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            payload = response.read()
        return json.loads(payload) if payload.strip() else None

    def __enter__(self) -> Broker:
        self.api("PUT", f"vhosts/{self.vhost}")
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        self.api("PUT", f"permissions/{self.vhost}/guest", everything)
        return self

    def __exit__(self, *exc: object) -> None:
        self.api("DELETE", f"vhosts/{self.vhost}")

    async def connect(self, user: str = "guest", password: str = "guest") -> AbstractConnection:
        url = f"amqp://{user}:{password}@127.0.0.1:{self.port}/{self.vhost}"
        return await aiormq.connect(url)


async def attempt(connection: AbstractConnection, what: str, probe: Probe) -> None:
    channel = await connection.channel()
    try:
        await probe(channel)
        print(f"  {what}: accepted")
    except aiormq.exceptions.AMQPError as exc:
        print(f"  {what}: REFUSED {str(exc)[:140]}")
    finally:
        if not channel.is_closed:
            await channel.close()


async def arguments(broker: Broker) -> None:
    """x-consumer-timeout per queue type (queue and consume argument); passive declares of a
    user without permissions."""
    connection = await broker.connect()
    print("RabbitMQ", connection.server_properties.get("version"))
    for kind in ("classic", "quorum", "stream"):
        typed = {"x-queue-type": kind}
        await attempt(
            connection,
            f"{kind}: queue argument x-consumer-timeout",
            lambda ch, k=kind, t=typed: ch.queue_declare(  # type: ignore[misc]
                f"{k}-arg", durable=True, arguments={**t, "x-consumer-timeout": 60000}
            ),
        )
        setup = await connection.channel()
        await setup.queue_declare(f"{kind}-plain", durable=True, arguments=typed)
        await setup.close()
        consume_arguments = {"x-consumer-timeout": 60000}
        if kind == "stream":
            consume_arguments["x-stream-offset"] = "first"

        async def consume(
            ch: AbstractChannel, k: str = kind, a: dict[str, Any] = consume_arguments
        ) -> None:
            await ch.basic_qos(prefetch_count=10)
            await ch.basic_consume(f"{k}-plain", _ignore, arguments=a)

        await attempt(connection, f"{kind}: basic.consume argument x-consumer-timeout", consume)
    setup = await connection.channel()
    await setup.exchange_declare("ex.none", exchange_type="fanout", durable=True)
    await setup.exchange_declare("ex.write", exchange_type="fanout", durable=True)
    await setup.queue_declare("q.none", durable=True)
    await setup.queue_declare("q.read", durable=True)
    await setup.close()
    user = f"u-{broker.vhost}"
    broker.api("PUT", f"users/{user}", {"password": "p", "tags": ""})
    grants = {"configure": "^$", "write": "^ex\\.write$", "read": "^q\\.read$"}
    broker.api("PUT", f"permissions/{broker.vhost}/{user}", grants)
    try:
        limited = await broker.connect(user, "p")
        for what, probe in (
            ("passive exchange, no permission", "ex.none"),
            ("passive exchange, write only", "ex.write"),
        ):
            await attempt(
                limited,
                what,
                lambda ch, n=probe: ch.exchange_declare(n, passive=True),  # type: ignore[misc]
            )
        for what, probe in (
            ("passive queue, no permission", "q.none"),
            ("passive queue, read only", "q.read"),
            ("passive missing queue, no permission", "q.missing"),
        ):
            await attempt(
                limited,
                what,
                lambda ch, n=probe: ch.queue_declare(n, passive=True),  # type: ignore[misc]
            )
        await limited.close()
    finally:
        broker.api("DELETE", f"users/{user}")
    await connection.close()


def _ignore(_message: DeliveredMessage) -> None:
    pass


async def consumer_timeout(broker: Broker, window: float) -> None:
    """A delivery never acked on a queue with a 3 s consumer timeout: what happens, when,
    where the message goes, and what a late ack does."""
    connection = await broker.connect()
    version = str(connection.server_properties.get("version"))
    print("RabbitMQ", version)
    await connection.close()
    cases: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]] = [
        ("quorum-queue-argument", "quorum", {"x-consumer-timeout": 3000}, None),
        ("quorum-consume-argument", "quorum", {}, {"x-consumer-timeout": 3000}),
    ]
    if not version.startswith("4.3"):
        cases.append(("classic-queue-argument", "classic", {"x-consumer-timeout": 3000}, None))
    await asyncio.gather(*(_timeout_case(broker, window, *case) for case in cases))


async def _timeout_case(
    broker: Broker,
    window: float,
    name: str,
    kind: str,
    queue_arguments: dict[str, Any],
    consume_arguments: dict[str, Any] | None,
) -> None:
    connection = await broker.connect()
    setup = await connection.channel()
    await setup.queue_declare(
        name, durable=True, arguments={"x-queue-type": kind, **queue_arguments}
    )
    await setup.basic_publish(b"x", routing_key=name)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=10)
    start = time.monotonic()
    events: list[str] = []
    held: list[DeliveredMessage] = []

    def note(text: str) -> None:
        events.append(f"{time.monotonic() - start:6.1f} s  {text}")

    def deliver(message: DeliveredMessage) -> None:
        held.append(message)
        note(f"delivered (redelivered={message.delivery.redelivered})")

    channel.on_consumer_cancel_callbacks.add(lambda frame: note("basic.cancel from the broker"))
    await channel.basic_consume(name, deliver, consumer_tag="c1", arguments=consume_arguments)
    while time.monotonic() - start < window and not channel.is_closed:
        if any("basic.cancel" in e for e in events):
            break
        await asyncio.sleep(0.1)
    if channel.is_closed:
        note(f"channel closed: {str(channel.closing.exception())[:110]}")
    elif not any("basic.cancel" in e for e in events):
        note("nothing happened")
    await asyncio.sleep(1)
    declared = await setup.queue_declare(name, passive=True)
    note(f"queue: {declared.message_count} ready, {declared.consumer_count} consumer(s)")
    if not channel.is_closed and held:
        await channel.basic_ack(held[0].delivery.delivery_tag)
        await asyncio.sleep(1.5)
        declared = await setup.queue_declare(name, passive=True)
        note(
            f"late ack accepted, channel open={not channel.is_closed}; queue: "
            f"{declared.message_count} ready, {declared.consumer_count} consumer(s)"
        )
    print(f"{name} ({kind}, queue {queue_arguments}, consume {consume_arguments}):")
    for event in events:
        print("   ", event)
    await connection.close()


async def delayed_retry(broker: Broker) -> None:
    """Quorum x-delayed-retry-*: delay per return, headers, what sees a waiting message."""
    for settle in ("nack", "reject"):
        for mode in ("all", "failed", "returned"):
            await _delayed_case(broker, settle, mode)
    connection = await broker.connect()
    channel = await connection.channel()
    queue = "delayed-visible"
    retry = {"x-delayed-retry-type": "all", "x-delayed-retry-min": 20000}
    retry["x-delayed-retry-max"] = 20000
    await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum", **retry})
    await channel.basic_publish(b"m", routing_key=queue)
    await asyncio.sleep(0.2)
    got = await channel.basic_get(queue)
    await channel.basic_reject(got.delivery.delivery_tag, requeue=True)
    await asyncio.sleep(0.5)
    declared = await channel.queue_declare(queue, passive=True)
    again = await channel.basic_get(queue)
    await asyncio.sleep(6)  # the management API's statistics tick
    info = broker.api("GET", f"queues/{broker.vhost}/{queue}")
    shown = {k: v for k, v in info.items() if "delay" in k or k.startswith("messages")}
    shown = {k: v for k, v in shown.items() if not k.endswith("_details")}
    print(
        f"a waiting message: passive declare counts {declared.message_count}; basic.get -> "
        f"{type(again.delivery).__name__}; management: {shown}"
    )
    await connection.close()


async def _delayed_case(broker: Broker, settle: str, mode: str) -> None:
    connection = await broker.connect()
    channel = await connection.channel()
    queue = f"delayed-{settle}-{mode}"
    arguments = {"x-queue-type": "quorum", "x-delayed-retry-type": mode}
    arguments.update({"x-delayed-retry-min": 1000, "x-delayed-retry-max": 4000})
    await channel.queue_declare(queue, durable=True, arguments=arguments)
    headers = {"rabbitflow-attempt": 1}
    properties = aiormq.spec.Basic.Properties(delivery_mode=2, headers=headers)
    await channel.basic_publish(b"m", routing_key=queue, properties=properties)
    await channel.basic_qos(prefetch_count=1)
    arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
    await channel.basic_consume(queue, arrived.put_nowait)
    message = await arrived.get()
    print(f"{queue}:")
    for n in range(1, 6):
        tag = message.delivery.delivery_tag
        if settle == "nack":
            await channel.basic_nack(tag, requeue=True)
        else:
            await channel.basic_reject(tag, requeue=True)
        returned = time.monotonic()
        message = await asyncio.wait_for(arrived.get(), 15)
        seen = message.header.properties.headers or {}
        counts = {k: seen.get(k) for k in ("x-delivery-count", "x-acquired-count")}
        print(
            f"    return {n}: back after {time.monotonic() - returned:.2f} s, {counts}, "
            f"rabbitflow-attempt {seen.get('rabbitflow-attempt')}"
        )
    await channel.basic_ack(message.delivery.delivery_tag)
    await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["arguments", "consumer-timeout", "delayed-retry"])
    parser.add_argument("--port", type=int, default=5672, help="AMQP port (API: port + 10000)")
    parser.add_argument("--window", type=float, default=100.0, help="consumer-timeout: wait")
    options = parser.parse_args()
    with Broker(options.port) as broker:
        if options.what == "arguments":
            asyncio.run(arguments(broker))
        elif options.what == "consumer-timeout":
            asyncio.run(consumer_timeout(broker, options.window))
        else:
            asyncio.run(delayed_retry(broker))


if __name__ == "__main__":
    main()
