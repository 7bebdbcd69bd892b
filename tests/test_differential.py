"""One behaviour suite, run on the in-memory broker and on a real RabbitMQ: both must agree.

Each test drives a :class:`Backend` (declare, publish, get, ack/nack, let time pass) and
asserts literal expectations, so the two backends are held to the same results. The real side
uses aio-pika on a fresh vhost; the memory side the aiormq-shaped channels of
:class:`~rabbitflow.testing.MemoryBroker`. Known differences are in ``docs/testing.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from rabbitflow import App, Message, Retry
from rabbitflow._broker_version import BrokerVersion
from rabbitflow.testing import MemoryBroker, MemoryChannel, TestApp
from rabbitflow.topology import Topology, derive, parse_topology
from rabbitflow.topology._declare import declare
from rabbitflow.topology._derived import UNLIMITED_DELIVERIES, Declarations, QueueSpec
from tests.support.amqp import dead_letter_to
from tests.support.broker import version_of
from tests.support.waiting import wait_for
from tests.support.worker import running

# Real-broker TTLs fire on a timer: give them this long past their deadline.
SLACK = 0.3


@dataclass
class Got:
    """A message fetched with basic.get, the same shape on both backends."""

    body: bytes
    headers: dict[str, Any]
    redelivered: bool
    exchange: str
    routing_key: str
    handle: Any

    def deaths(self) -> list[dict[str, Any]]:
        """``x-death`` with each ``time`` checked to be a timestamp and left out."""
        entries = []
        for death in self.headers.get("x-death", []):
            assert isinstance(death.pop("time"), datetime)
            entries.append(death)
        return entries


class Backend(Protocol):
    name: str
    # The RabbitMQ release whose behaviour is expected (the real one's, the one modelled).
    version: BrokerVersion

    async def declare(self, declarations: Declarations) -> None: ...

    async def reopen(self) -> None:
        """Close the channel (its unacked messages go back) and open a new one."""
        ...

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes = b"",
        *,
        headers: dict[str, Any] | None = None,
        expiration_ms: int | None = None,
        mandatory: bool = False,
    ) -> str: ...

    async def get(self, queue: str) -> Got | None: ...

    async def settle(self, got: Got, requeue: bool | None, *, reject: bool = False) -> None:
        """Ack (``requeue`` None), or nack, or with ``reject`` basic.reject."""
        ...

    async def wait(self, ms: int) -> None: ...

    async def hold(self, queue: str) -> Held:
        """Consume ``queue`` on a channel of its own and never ack."""
        ...

    def running(self, app: App, topology: Topology) -> Any: ...


@dataclass
class Held:
    """A consumer that never acks: what it got, and whether the broker cancelled it."""

    channel: Any
    bodies: list[bytes]
    cancelled: asyncio.Event

    @classmethod
    async def on(cls, channel: Any, queue: str) -> Held:
        """Consume ``queue`` on the aiormq-shaped ``channel``."""
        held = cls(channel, [], asyncio.Event())
        channel.on_consumer_cancel_callbacks.add(lambda _frame: held.cancelled.set())

        async def deliver(message: DeliveredMessage) -> None:
            held.bodies.append(message.body)

        await channel.basic_qos(prefetch_count=10)
        await channel.basic_consume(queue, deliver, no_ack=False)
        await wait_for(lambda: held.bodies, f"a delivery from {queue}", 1)
        return held


async def drain(backend: Backend, queue: str) -> list[Got]:
    """Get and ack every message of ``queue``."""
    messages = []
    while (got := await backend.get(queue)) is not None:
        await backend.settle(got, None)
        messages.append(got)
    return messages


async def bodies(backend: Backend, queue: str) -> list[bytes]:
    return [got.body for got in await drain(backend, queue)]


async def confirmed(publish: Awaitable[object]) -> str:
    """What the broker answered a publish with confirms: ``ack``, ``nack``, or ``returned``
    (mandatory and unroutable)."""
    try:
        await publish
    except aiormq.exceptions.PublishError:
        return "returned"
    except aiormq.exceptions.DeliveryError:
        return "nack"
    return "ack"


# -- the two backends ----------------------------------------------------------------------


class MemoryBackend:
    name = "memory"

    def __init__(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        self.broker = broker
        self.channel = channel
        self.version = broker.version

    async def declare(self, declarations: Declarations) -> None:
        self.broker.declare(declarations)

    async def reopen(self) -> None:
        await self.channel.close()
        self.channel = await self.broker.connect().channel()

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes = b"",
        *,
        headers: dict[str, Any] | None = None,
        expiration_ms: int | None = None,
        mandatory: bool = False,
    ) -> str:
        properties = spec.Basic.Properties(
            headers=headers,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
        )
        return await confirmed(
            self.channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )
        )

    async def get(self, queue: str) -> Got | None:
        message: DeliveredMessage = await self.channel.basic_get(queue)
        if isinstance(message.delivery, spec.Basic.GetEmpty):
            return None
        return Got(
            message.body,
            dict(message.header.properties.headers or {}),
            bool(message.redelivered),
            message.exchange or "",
            message.routing_key or "",
            message.delivery_tag,
        )

    async def settle(self, got: Got, requeue: bool | None, *, reject: bool = False) -> None:
        if requeue is None:
            await self.channel.basic_ack(got.handle)
        elif reject:
            await self.channel.basic_reject(got.handle, requeue=requeue)
        else:
            await self.channel.basic_nack(got.handle, requeue=requeue)

    async def wait(self, ms: int) -> None:
        self.broker.advance(ms)

    async def hold(self, queue: str) -> Held:
        return await Held.on(await self.broker.connect().channel(), queue)

    @asynccontextmanager
    async def running(self, app: App, topology: Topology) -> AsyncIterator[Runner]:
        async with TestApp(app, topology, broker=self.broker) as t:
            yield Runner(t.publish, t.drain)


class RabbitBackend:
    name = "rabbitmq"

    def __init__(self, url: str, connection: aio_pika.abc.AbstractConnection) -> None:
        self.url = url
        self.connection = connection
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.version = version_of(connection)

    async def open(self) -> None:
        self.channel = await self.connection.channel(on_return_raises=True)

    async def declare(self, declarations: Declarations) -> None:
        await declare(self.connection, declarations)

    async def reopen(self) -> None:
        assert self.channel is not None
        await self.channel.close()
        await asyncio.sleep(0.2)  # let the queue take the returned messages back
        await self.open()

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes = b"",
        *,
        headers: dict[str, Any] | None = None,
        expiration_ms: int | None = None,
        mandatory: bool = False,
    ) -> str:
        assert self.channel is not None
        target = (
            self.channel.default_exchange
            if exchange == ""
            else await self.channel.get_exchange(exchange, ensure=False)
        )
        message = aio_pika.Message(
            body,
            headers=headers,
            expiration=timedelta(milliseconds=expiration_ms) if expiration_ms is not None else None,
        )
        return await confirmed(target.publish(message, routing_key, mandatory=mandatory))

    async def get(self, queue: str) -> Got | None:
        assert self.channel is not None
        source = await self.channel.get_queue(queue, ensure=False)
        message: AbstractIncomingMessage | None = await source.get(no_ack=False, fail=False)
        if message is None:
            return None
        return Got(
            message.body,
            dict(message.headers),
            bool(message.redelivered),
            message.exchange or "",
            message.routing_key or "",
            message,
        )

    async def settle(self, got: Got, requeue: bool | None, *, reject: bool = False) -> None:
        if requeue is None:
            await got.handle.ack()
        elif reject:
            await got.handle.reject(requeue=requeue)
        else:
            await got.handle.nack(requeue=requeue)
        await asyncio.sleep(0.05)  # acks are asynchronous: let the queue apply it

    async def wait(self, ms: int) -> None:
        await asyncio.sleep(ms / 1000 + SLACK)

    async def hold(self, queue: str) -> Held:
        channel = await self.connection.channel()
        return await Held.on(await channel.get_underlay_channel(), queue)

    @asynccontextmanager
    async def running(self, app: App, topology: Topology) -> AsyncIterator[Runner]:
        async with running(app, self.url, topology=topology, shutdown_timeout=2):
            yield Runner(app.publish, None)


@dataclass
class Runner:
    """An app consuming on a backend: publish through it, then wait for a condition."""

    publish: Callable[..., Any]
    _drain: Callable[[], Any] | None

    async def until(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:
        if self._drain is not None:
            await self._drain()
            assert condition()
            return
        await wait_for(condition, "the condition on the real broker", timeout, 0.05)


@pytest.fixture(
    params=[
        "memory-4.0",
        "memory-3.10",
        "memory-4.3",
        pytest.param("rabbitmq", marks=pytest.mark.broker),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with _backend(request) as chosen:
        yield chosen


@pytest.fixture(params=["memory-4.3", pytest.param("rabbitmq", marks=pytest.mark.broker)])
async def backend_4_3(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A backend that behaves like RabbitMQ 4.3 or later (the real broker must be one)."""
    async with _backend(request) as chosen:
        if not chosen.version.at_least(4, 3):
            pytest.skip(
                f"consumer timeouts cancel from RabbitMQ 4.3; this broker is {chosen.version}"
            )
        yield chosen


@asynccontextmanager
async def _backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The backend ``request.param`` names: ``memory-VERSION`` or ``rabbitmq`` (a fresh vhost)."""
    if request.param.startswith("memory"):
        broker = MemoryBroker(version=request.param.removeprefix("memory-"))
        try:
            yield MemoryBackend(broker, await broker.connect().channel())
        finally:
            await broker.close()
        return
    url = request.getfixturevalue("vhost_url")
    connection = await aio_pika.connect(url)
    try:
        real = RabbitBackend(url, connection)
        await real.open()
        yield real
    finally:
        await connection.close()


def topology(text: str) -> Topology:
    return parse_topology(text)


BARE = '[defaults]\nqueue_type = "classic"\nretry = false\ndead_letter = false\n'


def queues(*specs: QueueSpec) -> Declarations:
    return Declarations((), (), specs, (), {})


def queue(name: str, kind: str = "classic", arguments: dict[str, Any] | None = None) -> QueueSpec:
    return QueueSpec(name, "work", name, arguments={"x-queue-type": kind, **(arguments or {})})


# -- routing -------------------------------------------------------------------------------

PATTERNS = ["#", "*", "", "a.#", "#.a", "a.*", "*.a", "a.#.b", "a..b", "a.*.#", "*.*", "#.*", "a."]
KEYS = ["", "a", "b", "a.b", "a.a", "a.b.c", "a..b", "a.", ".a", ".", "a.x.y.b", "x.a"]
TOPIC_MATCHES = {
    "#": KEYS,
    "*": ["a", "b"],
    "": [""],
    "a.#": ["a", "a.b", "a.a", "a.b.c", "a..b", "a.", "a.x.y.b"],
    "#.a": ["a", "a.a", ".a", "x.a"],
    "a.*": ["a.b", "a.a", "a."],
    "*.a": ["a.a", ".a", "x.a"],
    "a.#.b": ["a.b", "a..b", "a.x.y.b"],
    "a..b": ["a..b"],
    "a.*.#": ["a.b", "a.a", "a.b.c", "a..b", "a.", "a.x.y.b"],
    "*.*": ["a.b", "a.a", "a.", ".a", ".", "x.a"],
    "#.*": [key for key in KEYS if key != ""],
    "a.": ["a."],
}


async def test_topic_routing_matches_rabbitmq(backend: Backend) -> None:
    text = BARE + '[exchanges.t]\ntype = "topic"\n'
    for index, pattern in enumerate(PATTERNS):
        text += f'[queues.p{index}]\nbindings = [{{ exchange = "t", routing_key = "{pattern}" }}]\n'
    await backend.declare(derive(topology(text)))

    for key in KEYS:
        await backend.publish("t", key, key.encode())

    for index, pattern in enumerate(PATTERNS):
        got = [body.decode() for body in await bodies(backend, f"p{index}")]
        assert got == TOPIC_MATCHES[pattern], f"pattern {pattern!r}"


HEADER_BINDINGS: dict[str, dict[str, Any]] = {
    "all": {"x-match": "all", "a": "1", "b": "2"},
    "any": {"x-match": "any", "a": "1", "b": "2"},
    "allx": {"x-match": "all-with-x", "x-a": "1"},
    "anyx": {"x-match": "any-with-x", "x-a": "1", "b": "2"},
    "xignored": {"x-match": "any", "x-a": "1"},
    "int": {"x-match": "all", "n": 1},
    "default": {"a": "1"},
}
HEADER_MESSAGES: list[dict[str, Any]] = [
    {"a": "1", "b": "2"},
    {"a": "1"},
    {"x-a": "1"},
    {"x-a": "1", "b": "2"},
    {"n": 1},
    {"n": "1"},
    {"a": "1", "b": "3"},
]
HEADER_MATCHES = {
    "all": ["0"],
    "any": ["0", "1", "3", "6"],
    "allx": ["2", "3"],
    "anyx": ["0", "2", "3"],
    "xignored": [],
    "int": ["4"],
    "default": ["0", "1", "6"],
}


def _toml_value(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


async def test_headers_exchange_matches_rabbitmq(backend: Backend) -> None:
    text = BARE + '[exchanges.h]\ntype = "headers"\n'
    for name, arguments in HEADER_BINDINGS.items():
        table = ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in arguments.items())
        text += f'[queues.h-{name}]\nbindings = [{{ exchange = "h", arguments = {{ {table} }} }}]\n'
    await backend.declare(derive(topology(text)))

    for index, headers in enumerate(HEADER_MESSAGES):
        await backend.publish("h", "", str(index).encode(), headers=headers)

    for name in HEADER_BINDINGS:
        got = [body.decode() for body in await bodies(backend, f"h-{name}")]
        assert got == HEADER_MATCHES[name], f"binding {name}"


async def test_exchange_to_exchange_default_exchange_and_returns(backend: Backend) -> None:
    text = BARE + (
        '[exchanges.orders]\ntype = "topic"\n'
        '[exchanges.audit]\ntype = "fanout"\n'
        'bindings = [{ exchange = "orders", routing_key = "order.#" }]\n'
        '[queues.billing]\nbindings = [{ exchange = "orders", routing_key = "order.created" }]\n'
        '[queues.audit-log]\nbindings = [{ exchange = "audit" }]\n'
    )
    await backend.declare(derive(topology(text)))

    assert await backend.publish("orders", "order.created", b"1", mandatory=True) == "ack"
    assert await backend.publish("orders", "order.paid", b"2", mandatory=True) == "ack"
    assert await backend.publish("orders", "invoice.sent", b"3", mandatory=True) == "returned"
    assert await backend.publish("orders", "invoice.sent", b"4") == "ack"
    assert await backend.publish("", "billing", b"5", mandatory=True) == "ack"
    assert await backend.publish("", "nobody", b"6", mandatory=True) == "returned"

    assert await bodies(backend, "billing") == [b"1", b"5"]
    assert await bodies(backend, "audit-log") == [b"1", b"2"]
    received = await drain(backend, "audit-log")
    assert received == []


# -- TTL and dead-lettering ----------------------------------------------------------------


async def test_ttl_dead_letter_chain_records_x_death(backend: Backend) -> None:
    await backend.declare(
        queues(
            queue("end"),
            queue("second", "classic", {"x-message-ttl": 100, **dead_letter_to("end")}),
            queue("first", "classic", {"x-message-ttl": 100, **dead_letter_to("second")}),
            queue("ping", "classic", {"x-message-ttl": 50, **dead_letter_to("pong")}),
            queue("pong", "classic", {"x-message-ttl": 50, **dead_letter_to("ping")}),
            queue("short", "classic", dead_letter_to("end")),
        )
    )
    await backend.publish("", "first", b"chained", headers={"user": "kept"})
    await backend.publish("", "ping", b"looping")
    await backend.publish("", "short", b"own-ttl", expiration_ms=50)

    await backend.wait(100)
    await backend.wait(100)
    await backend.wait(100)

    own, chained = await drain(backend, "end")  # in the order they expired
    assert (chained.body, chained.exchange, chained.routing_key) == (b"chained", "", "end")
    assert chained.deaths() == [
        {
            "count": 1,
            "reason": "expired",
            "queue": "second",
            "exchange": "",
            "routing-keys": ["second"],
        },
        {
            "count": 1,
            "reason": "expired",
            "queue": "first",
            "exchange": "",
            "routing-keys": ["first"],
        },
    ]
    assert chained.headers["user"] == "kept"
    assert chained.headers["x-first-death-queue"] == "first"
    assert chained.headers["x-first-death-reason"] == "expired"
    # A per-message TTL is removed and remembered in x-death.
    assert own.deaths() == [
        {
            "count": 1,
            "reason": "expired",
            "queue": "short",
            "exchange": "",
            "routing-keys": ["short"],
            "original-expiration": "50",
        }
    ]
    # A message expiring round a loop with no rejection in it is dropped.
    assert await drain(backend, "ping") == []
    assert await drain(backend, "pong") == []


async def test_rejections_count_in_one_x_death_entry(backend: Backend) -> None:
    await backend.declare(queues(queue("again", "classic", dead_letter_to("again"))))
    await backend.publish("", "again", b"m")
    counts = []
    for _ in range(3):
        got = await backend.get("again")
        assert got is not None
        counts.append([d["count"] for d in got.deaths()])
        await backend.settle(got, requeue=False)
    (last,) = await drain(backend, "again")
    assert counts == [[], [1], [2]]
    assert last.deaths() == [
        {
            "count": 3,
            "reason": "rejected",
            "queue": "again",
            "exchange": "",
            "routing-keys": ["again"],
        }
    ]


async def test_a_repeated_death_moves_its_entry_to_the_front(backend: Backend) -> None:
    await backend.declare(
        queues(
            queue("left", "classic", dead_letter_to("right")),
            queue("right", "classic", dead_letter_to("left")),
        )
    )
    await backend.publish("", "left", b"m")
    for source in ("left", "right", "left"):
        got = await backend.get(source)
        assert got is not None, source
        await backend.settle(got, requeue=False)

    (last,) = await drain(backend, "right")
    assert [(d["queue"], d["count"]) for d in last.deaths()] == [("left", 2), ("right", 1)]
    assert last.headers["x-first-death-queue"] == "left"
    assert (last.exchange, last.routing_key) == ("", "right")


@pytest.mark.parametrize("kind", ["classic", "quorum"])
async def test_requeued_messages_return_where_rabbitmq_puts_them(
    backend: Backend, kind: str
) -> None:
    if kind == "classic":
        order = [b"0", b"1", b"3"]  # back in their original positions
    elif backend.version.requeue_to_head:
        order = [b"1", b"0", b"3"]  # 4.0+: at the head, in the order they came back
    else:
        order = [b"3", b"1", b"0"]  # 3.x: appended, in the order they came back
    await backend.declare(queues(queue("rq", kind)))
    for i in range(4):
        await backend.publish("", "rq", str(i).encode())
    held = [await backend.get("rq") for _ in range(3)]
    assert all(got is not None for got in held)
    await backend.settle(held[1], requeue=True)  # type: ignore[arg-type]
    await backend.settle(held[0], requeue=True)  # type: ignore[arg-type]

    again = await drain(backend, "rq")
    await backend.settle(held[2], None)  # type: ignore[arg-type]
    assert [got.body for got in again] == order
    assert {got.body: got.redelivered for got in again} == {b"0": True, b"1": True, b"3": False}


@pytest.mark.parametrize("kind", ["classic", "quorum"])
async def test_a_closed_channel_gives_its_messages_back_in_order(
    backend: Backend, kind: str
) -> None:
    await backend.declare(queues(queue("cq", kind)))
    for i in range(5):
        await backend.publish("", "cq", str(i).encode())
    held = [await backend.get("cq") for _ in range(3)]
    assert [got.body for got in held if got is not None] == [b"0", b"1", b"2"]

    await backend.reopen()

    # Classic: back in place. Quorum, 3.10 as 4.0: a closed channel's messages go to the head,
    # in order (unlike a nack with requeue on 3.x, which sends a message to the back).
    again = await drain(backend, "cq")
    assert [got.body for got in again] == [b"0", b"1", b"2", b"3", b"4"]
    assert [got.redelivered for got in again] == [True, True, True, False, False]


@pytest.mark.parametrize("kind", ["classic", "quorum"])
async def test_max_length_overflow(backend: Backend, kind: str) -> None:
    await backend.declare(
        queues(
            queue("dropped"),
            queue("capped", kind, {"x-max-length": 2, **dead_letter_to("dropped")}),
            queue("strict", kind, {"x-max-length": 2, "x-overflow": "reject-publish"}),
        )
    )
    for i in range(4):
        assert await backend.publish("", "capped", f"c{i}".encode()) == "ack"
    confirms = [await backend.publish("", "strict", f"s{i}".encode()) for i in range(4)]

    assert await bodies(backend, "capped") == [b"c2", b"c3"]
    heads = await drain(backend, "dropped")
    assert [got.body for got in heads] == [b"c0", b"c1"]
    assert heads[0].deaths()[0]["reason"] == "maxlen"
    # A classic queue refuses the publish that would cross the limit; a quorum queue (3.10)
    # takes it and refuses the ones after, until it drains below its soft limit.
    if kind == "classic":
        assert confirms == ["ack", "ack", "nack", "nack"]
        assert await bodies(backend, "strict") == [b"s0", b"s1"]
    else:
        assert confirms == ["ack", "ack", "ack", "nack"]
        assert await bodies(backend, "strict") == [b"s0", b"s1", b"s2"]


async def test_quorum_delivery_limit_dead_letters_with_delivery_count(backend: Backend) -> None:
    text = (
        "[defaults]\nretry = false\ncrash_limit = 2\n"
        '[exchanges.jobs]\ntype = "direct"\n'
        '[queues.crashy]\nbindings = [{ exchange = "jobs", routing_key = "crashy" }]\n'
    )
    await backend.declare(derive(topology(text)))
    await backend.publish("jobs", "crashy", b"poison")

    # basic.reject with requeue counts on every version (a nack does not from 4.3: below).
    # Bounded: a broker that counted nothing would loop for ever.
    seen = []
    while len(seen) < 10 and (got := await backend.get("crashy")) is not None:
        seen.append((got.headers.get("x-delivery-count"), got.redelivered))
        await backend.settle(got, requeue=True, reject=True)
    # Before 3.12 the first delivery says x-delivery-count 0; from 3.12 it has no header.
    first = 0 if backend.version.counts_first_delivery else None
    assert seen == [(first, False), (1, True), (2, True)]

    dead = await eventually(backend, "crashy.dlq")
    assert (dead.body, dead.exchange, dead.routing_key) == (b"poison", "dlx", "crashy")
    assert dead.deaths() == [
        {
            "count": 1,
            "reason": "delivery_limit",
            "queue": "crashy",
            "exchange": "jobs",
            "routing-keys": ["crashy"],
        }
    ]
    assert dead.headers["x-first-death-reason"] == "delivery_limit"


@pytest.mark.parametrize(
    ("limit", "returns_until_gone"),
    [
        (None, "default"),  # RabbitMQ 4.0's default limit of 20; none before
        (UNLIMITED_DELIVERIES, None),  # what rabbitflow declares on DLQs: never reached
    ],
)
async def test_how_often_a_quorum_message_may_be_returned(
    backend: Backend, limit: int | None, returns_until_gone: str | None
) -> None:
    arguments = {} if limit is None else {"x-delivery-limit": limit}
    await backend.declare(queues(queue("returned", "quorum", arguments)))
    await backend.publish("", "returned", b"m")

    deliveries = 0
    while deliveries < 25 and (got := await backend.get("returned")) is not None:
        deliveries += 1
        await backend.settle(got, requeue=True, reject=True)

    default = backend.version.default_delivery_limit
    if returns_until_gone == "default" and default is not None:
        assert deliveries == default + 1  # dropped (no dead-letter exchange) after the last
    else:
        assert deliveries == 25
        assert [got.body for got in await drain(backend, "returned")] == [b"m"]


async def test_a_nack_counts_toward_the_delivery_limit_only_before_4_3(backend: Backend) -> None:
    # Given a quorum queue with a delivery limit of 2 and a dead-letter queue
    arguments = {"x-delivery-limit": 2, **dead_letter_to("nacked.dlq")}
    await backend.declare(queues(queue("nacked.dlq"), queue("nacked", "quorum", arguments)))
    await backend.publish("", "nacked", b"m")

    # When a consumer nacks it with requeue again and again (bounded)
    seen = []
    while len(seen) < 6 and (got := await backend.get("nacked")) is not None:
        seen.append((got.headers.get("x-delivery-count"), got.headers.get("x-acquired-count")))
        await backend.settle(got, requeue=True)

    if backend.version.nack_counts:
        # Then before 4.3 every nack counts: dead-lettered after the limit, as a reject is
        first = 0 if backend.version.counts_first_delivery else None
        assert seen == [(first, None), (1, None), (2, None)]
        assert (await eventually(backend, "nacked.dlq")).body == b"m"
    else:
        # Then on 4.3 a nack is free: still in the queue after six deliveries, no
        # x-delivery-count, and x-acquired-count counting every earlier delivery
        assert seen == [(None, None), (None, 1), (None, 2), (None, 3), (None, 4), (None, 5)]
        assert await backend.get("nacked.dlq") is None
        assert await bodies(backend, "nacked") == [b"m"]


async def test_a_closed_channel_counts_its_deliveries_on_every_version(backend: Backend) -> None:
    # Given a quorum queue with a delivery limit of 1 and a dead-letter queue
    arguments = {"x-delivery-limit": 1, **dead_letter_to("lost.dlq")}
    await backend.declare(queues(queue("lost.dlq"), queue("lost", "quorum", arguments)))
    await backend.publish("", "lost", b"m")

    # When the channel holding it closes, twice (what a crash does to a delivery)
    seen = []
    for _ in range(3):
        got = await backend.get("lost")
        if got is None:
            break
        seen.append((got.headers.get("x-delivery-count"), got.headers.get("x-acquired-count")))
        await backend.reopen()

    # Then each close counted: x-delivery-count 1 after the first, dead-lettered after the
    # second; 4.3 also counts the delivery in x-acquired-count
    first = 0 if backend.version.counts_first_delivery else None
    acquired = 1 if backend.version.counts_acquisitions else None
    assert seen == [(first, None), (1, acquired)]
    assert (await eventually(backend, "lost.dlq")).body == b"m"


async def test_a_quorum_consumer_past_its_timeout_is_cancelled_and_its_messages_go_back(
    backend_4_3: Backend,
) -> None:
    backend = backend_4_3
    # Given a quorum queue with a consumer timeout of 1 s and a consumer that never acks
    await backend.declare(queues(queue("stuck", "quorum", {"x-consumer-timeout": 1000})))
    await backend.publish("", "stuck", b"m")
    held = await backend.hold("stuck")
    assert held.bodies == [b"m"]

    # When the timeout passes
    await backend.wait(1500)

    # Then 4.3 cancels the consumer (basic.cancel) and keeps its channel open, and the
    # message is back in the queue, uncounted: x-acquired-count 1, no x-delivery-count
    await wait_for(held.cancelled.is_set, "the consumer's basic.cancel", 1)
    assert not held.channel.is_closed
    got = await backend.get("stuck")
    assert got is not None
    assert (got.body, got.redelivered) == (b"m", True)
    assert (got.headers.get("x-delivery-count"), got.headers.get("x-acquired-count")) == (None, 1)
    await backend.settle(got, None)


async def eventually(backend: Backend, queue: str) -> Got:
    """The next message of ``queue``, waiting a little for the real broker's dead-lettering."""
    for _ in range(40):
        got = await backend.get(queue)
        if got is not None:
            await backend.settle(got, None)
            return got
        await backend.wait(0) if backend.name == "memory" else await asyncio.sleep(0.05)
    raise AssertionError(f"nothing arrived in {queue}")


# -- rabbitflow end to end -----------------------------------------------------------------

RETRY_TOPOLOGY = """
[exchanges.jobs]
type = "direct"

[queues.work]
bindings = [{ exchange = "jobs", routing_key = "work" }]
retry = { delays = ["200ms", "400ms"], max_attempts = 3 }
"""


async def test_retry_tiers_end_to_end(backend: Backend) -> None:
    app = App(name="differential")
    runs: list[tuple[int, int]] = []

    @app.consumer("work")
    async def work(job: dict[str, int], message: Message) -> None:
        runs.append((job["id"], message.attempt))
        if job["id"] == 1 and message.attempt < 3:
            raise RuntimeError("flaky")
        if job["id"] == 2:
            raise RuntimeError("broken")
        if job["id"] == 3 and message.attempt == 1:
            raise Retry(delay="700ms")  # longer than the largest tier: parked, then run once

    tiers = topology(RETRY_TOPOLOGY)
    async with backend.running(app, tiers) as runner:
        await runner.publish("jobs", "work", {"id": 1}, headers={"tenant": "t1"})
        await runner.publish("jobs", "work", {"id": 2}, headers={"tenant": "t2"})
        await runner.publish("jobs", "work", {"id": 3})
        await runner.until(lambda: len(runs) == 8)
        dead = await eventually(backend, "work.dlq")

    assert sorted(runs) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2)]
    assert dead.body == b'{"id":2}'
    assert (dead.exchange, dead.routing_key) == ("dlx", "work")
    assert dead.headers["tenant"] == "t2"
    assert dead.headers["rabbitflow-attempt"] == 3
    assert dead.headers["rabbitflow-origin-queue"] == "work"
    assert dead.headers["rabbitflow-origin-exchange"] == "jobs"
    assert dead.headers["rabbitflow-origin-routing-key"] == "work"
    assert dead.headers["rabbitflow-error-type"] == "RuntimeError"
    assert dead.headers["rabbitflow-error-message"] == "broken"
    assert "RuntimeError: broken" in dead.headers["rabbitflow-error-stack"]
    assert "x-death" not in dead.headers  # rabbitflow does not carry broker headers along
    assert await drain(backend, "work.dlq") == []
    for tier in ("work.retry.200ms", "work.retry.400ms", "work"):
        assert await drain(backend, tier) == []
