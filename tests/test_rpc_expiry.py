"""Requests that expire (docs/handlers.md, "Requests that expire").

Against the real RabbitMQ, the cases of issue 22 measured on the release before: a burst of
requests whose callers give up ran anyway, after every caller had gone, and held up a fresh
request; a request nobody consumed stayed in its queue for ever; a timeout could not tell
whether the request had been sent. Then the worker's side on the in-memory broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from pathlib import Path

import aio_pika
import pytest

from rabbitflow import App, Message, RequestTimeout
from rabbitflow import _headers as h
from rabbitflow._rpc import expiry
from rabbitflow.dlq import replay_headers
from rabbitflow.testing import TestApp
from rabbitflow.topology import parse_topology
from tests.support.amqp import declare_topology, message_counts_async
from tests.support.network import silent_server
from tests.support.worker import running

TOPOLOGY = """
[queues."rpc.slow"]
prefetch = 1
retry = false

[queues."rpc.idle"]
retry = false

[queues."rpc.idle.nodlq"]
retry = false
dead_letter = false

[queues."rpc.idle.classic"]
queue_type = "classic"
retry = false

[queues."rpc.tiny"]
retry = false
"""


@pytest.fixture
def topology(tmp_path: Path) -> str:
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    return str(path)


async def taken(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message of ``queue``, taken off it."""
    found = []
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            found.append(message)
    return found


async def wait_empty(url: str, queue: str, within: float) -> float:
    """Seconds until ``queue`` holds no message; fails after ``within``."""
    loop = asyncio.get_running_loop()
    begun = loop.time()
    while (await message_counts_async(url, [queue]))[queue]:
        assert loop.time() - begun < within, f"{queue} still holds its request after {within}s"
        await asyncio.sleep(0.05)
    return loop.time() - begun


async def wait_count(url: str, queue: str, count: int, within: float) -> None:
    """Until ``queue`` holds ``count`` messages (dead-lettering is asynchronous)."""
    loop = asyncio.get_running_loop()
    begun = loop.time()
    while (held := (await message_counts_async(url, [queue]))[queue]) < count:
        assert loop.time() - begun < within, f"{queue} holds {held} of {count} after {within}s"
        await asyncio.sleep(0.05)


@pytest.mark.broker
async def test_requests_whose_callers_gave_up_never_run_and_do_not_hold_up_a_fresh_one(
    vhost_url: str, topology: str, caller: App
) -> None:
    # Given: a 50 ms handler at prefetch 1, and a burst of 60 requests that wait 0.3 s each
    server = App(url=vhost_url, topology=topology)
    loop = asyncio.get_running_loop()
    started: dict[str, float] = {}

    @server.consumer("rpc.slow")
    async def answer(request: dict[str, str]) -> dict[str, str]:
        started[request["id"]] = loop.time()
        await asyncio.sleep(0.05)
        return {"id": request["id"]}

    await declare_topology(server, vhost_url)
    deadlines: dict[str, float] = {}
    outcomes: dict[str, str] = {}

    async def ask(key: str, timeout: float) -> None:
        deadlines[key] = loop.time() + timeout
        try:
            await caller.request("", "rpc.slow", {"id": key}, timeout=timeout)
            outcomes[key] = "answered"
        except RequestTimeout as exc:
            outcomes[key] = f"timed out, sent={exc.sent}"

    async with running(server, vhost_url):
        await ask("warm-up", 5)
        # When: the burst times out behind the 50 ms handler
        await asyncio.gather(*(ask(f"r{n}", 0.3) for n in range(60)))
        timed_out = [key for key, outcome in outcomes.items() if outcome.startswith("timed")]
        assert len(timed_out) >= 40, outcomes  # the backlog the issue measured
        assert {outcomes[key] for key in timed_out} == {"timed out, sent=True"}
        # Then: a fresh request is answered at once, not after the burst's handlers
        fresh_at = loop.time()
        await ask("fresh", 3)
        assert outcomes["fresh"] == "answered"
        assert loop.time() - fresh_at < 2.0
        await asyncio.sleep(0.5)  # anything still to run would run now
    # ...and every handler that ran started while its caller still waited (the test takes
    # its deadline a few microseconds before app.request does)
    late = {k: started[k] - deadlines[k] for k in started if started[k] > deadlines[k] + 0.001}
    assert late == {}
    assert len(started) < len(deadlines) - 30  # most of the burst never ran
    # ...and no request is left anywhere: not in the queue, not in its DLQ
    counts = await message_counts_async(vhost_url, ["rpc.slow", "rpc.slow.dlq"])
    assert counts == {"rpc.slow": 0, "rpc.slow.dlq": 0}


@pytest.mark.broker
async def test_a_request_nobody_consumes_leaves_its_queue_after_its_timeout(
    vhost_url: str, topology: str, caller: App
) -> None:
    # Given: queues that nobody consumes: quorum without and with a DLQ, classic with one
    await declare_topology(App(url=vhost_url, topology=topology), vhost_url)
    for queue in ("rpc.idle.nodlq", "rpc.idle", "rpc.idle.classic"):
        # When: a request to it times out
        with pytest.raises(RequestTimeout) as timed_out:
            await caller.request("", queue, {"sku": "A1"}, timeout=0.3, message_id=queue)
        assert timed_out.value.sent is True
        assert timed_out.value.message_id == queue
        assert (await message_counts_async(vhost_url, [queue]))[queue] == 1
        # Then: the broker drops it a grace (1 s) after the deadline, not never
        assert await wait_empty(vhost_url, queue, within=3.0) < 2.5
    # ...and where the queue has a DLQ, the broker dead-letters it there as expired
    for queue in ("rpc.idle", "rpc.idle.classic"):
        await wait_count(vhost_url, f"{queue}.dlq", 1, within=2.0)
        [letter] = await taken(vhost_url, f"{queue}.dlq")
        assert letter.message_id == queue
        assert letter.headers["x-first-death-reason"] == "expired"
        assert h.DEADLINE in letter.headers


@pytest.mark.broker
async def test_a_timeout_says_whether_the_request_was_sent(
    vhost_url: str, topology: str, caller: App
) -> None:
    # Given: a queue nobody consumes, whose expired requests go to its DLQ
    await declare_topology(App(url=vhost_url, topology=topology), vhost_url)
    with contextlib.suppress(RequestTimeout):  # the connection is open before the timed calls
        await caller.request("", "rpc.tiny", {}, timeout=0.5, message_id="warm-up")
    rng = random.Random(22)
    sent: dict[str, bool] = {}

    async def ask(key: str) -> None:
        try:
            await caller.request("", "rpc.tiny", {}, timeout=rng.uniform(0.001, 0.1),
                                 message_id=key)  # fmt: skip
        except RequestTimeout as exc:
            sent[key] = exc.sent

    # When: 300 requests time out within 1-100 ms, many of them while publishing
    await asyncio.gather(*(ask(f"t{n}") for n in range(300)))
    assert len(sent) == 300
    said_sent = {key for key, was in sent.items() if was}
    await wait_empty(vhost_url, "rpc.tiny", within=5.0)
    await wait_count(vhost_url, "rpc.tiny.dlq", len(said_sent) + 1, within=2.0)
    await asyncio.sleep(0.2)  # a request not meant to be there would have arrived too
    # Then: the requests that reached the broker are exactly those that say sent=True
    reached = {m.message_id for m in await taken(vhost_url, "rpc.tiny.dlq")} - {"warm-up"}
    assert reached == said_sent
    assert 0 < len(said_sent) < 300  # both kinds happened


async def test_a_timeout_while_connecting_was_not_sent_and_the_connect_goes_on() -> None:
    # Given: a server that accepts TCP connections and never answers the AMQP handshake
    async with silent_server() as port:
        app = App(url=f"amqp://guest:guest@127.0.0.1:{port}/", topology="missing.toml")
        loop = asyncio.get_running_loop()
        try:
            # When: a request waits 0.3 s
            begun = loop.time()
            with pytest.raises(RequestTimeout) as timed_out:
                await app.request("", "rpc.idle", {}, timeout=0.3)
            # Then: it says so after 0.3 s, and that the request was not sent
            assert loop.time() - begun < 1.0
            assert timed_out.value.sent is False
            assert "not sent" in str(timed_out.value)
        finally:
            await app.close()
    await asyncio.sleep(0.1)  # the connect ends with the sockets


# -- the worker's side, on the in-memory broker --------------------------------------------------

MEMORY = parse_topology('[queues."rpc.quotes"]\nretry = false\n')


async def test_a_request_past_its_deadline_is_settled_without_running() -> None:
    app = App()
    ran: list[str] = []

    @app.consumer("rpc.quotes")
    async def quote(request: dict[str, str]) -> None:
        ran.append(request["sku"])

    async with TestApp(app, MEMORY) as t:
        past, ahead = "2000-01-01T00:00:00.000Z", "2999-01-01T00:00:00.000Z"
        await t.publish("", "rpc.quotes", {"sku": "late"}, headers={h.DEADLINE: past})
        await t.publish("", "rpc.quotes", {"sku": "awaited"}, headers={h.DEADLINE: ahead})
        await t.publish("", "rpc.quotes", {"sku": "garbled"}, headers={h.DEADLINE: "soon"})
        await t.drain()
        assert ran == ["awaited", "garbled"]  # a deadline that is no timestamp is ignored
        assert t.dead_letters("rpc.quotes") == []  # an expired request is not a dead letter


async def test_a_replayed_request_loses_its_deadline() -> None:
    headers = {h.DEADLINE: "2000-01-01T00:00:00.000Z", "tenant": "acme", h.ATTEMPT: 3}
    assert replay_headers(headers) == {"tenant": "acme", h.ATTEMPT: 1, h.REPLAY_COUNT: 1}


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
async def test_a_timeout_that_is_no_positive_duration_is_refused(timeout: float) -> None:
    app = App(url="amqp://guest:guest@127.0.0.1:1/", topology="missing.toml")
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        await app.request("", "rpc.quotes", {}, timeout=timeout)


async def test_a_request_without_end_carries_no_deadline() -> None:
    app = App()
    seen: list[object] = []

    @app.consumer("rpc.quotes")
    async def quote(request: dict[str, str], message: Message) -> str:
        seen.append(message.headers.get(h.DEADLINE))
        return "ok"

    async with TestApp(app, MEMORY):
        assert await app.request("", "rpc.quotes", {}, timeout=math.inf) == "ok"
        assert await app.request("", "rpc.quotes", {}, timeout=5) == "ok"
    assert seen[0] is None
    assert isinstance(seen[1], str)
    assert seen[1].endswith("Z")


def test_the_broker_keeps_a_request_as_long_again_as_its_caller_waits_at_least_a_second() -> None:
    assert expiry(5.0)[0] == 10_000
    assert expiry(0.3)[0] == 300 + 1000
    assert expiry(0.0001)[0] == 1 + 1000  # never a TTL of 0: "deliver now or drop"
    assert expiry(math.inf) == (None, None)
