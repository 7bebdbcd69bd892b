"""Deeper faults: derived objects deleted under a running worker, a blocked broker at shutdown,
a server that accepts and resets, a publisher channel closed by 404s, forged and far-future
headers. Each is judged like the rest of the suite: lost = 0, handler runs bounded.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pytest
from pamqp import commands as spec

from rabbitflow._publisher import Publisher
from rabbitflow._worker import DRAIN_GRACE
from rabbitflow.connection import connect
from rabbitflow.errors import PublishError, UnreachableBrokerError
from tests.reliability.chaos_node import ChaosNode
from tests.reliability.checker import Checker, header_text, job
from tests.reliability.proxy import ChaosProxy
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.chaos]


def _failing(keys: set[str]) -> object:
    return lambda n: job(n, action="fail") if str(n) in keys else job(n)


def test_quorum_queue_with_its_dlq_deleted_loses_nothing(checker: Checker) -> None:
    # Given a worker on a quorum queue whose DLQ an operator deletes while it runs
    checker.write_topology(queue_type="quorum", retry='{ delays = ["100ms"], max_attempts = 2 }')
    worker = checker.start_worker(sleep=0.0)
    checker.rabbit.admin.delete_queue(checker.vhost, "work.dlq")

    # When five of 100 messages always fail
    poison = {"10", "30", "50", "70", "90"}
    checker.feed(100, rate=200, body=_failing(poison))  # type: ignore[arg-type]
    checker.drain()

    # Then the worker declared the DLQ again and every poison message is in it
    report = checker.report("DLQ deleted while running (quorum)", 1, duplicate_bound=0)
    report.check()
    assert {message.message_id for message in checker.dead} == poison
    assert worker.has_event(
        "the dead-letter exchange 'dlx' or the DLQ bound to it for 'work' is missing on the broker"
        " (deleted while the worker ran?); declaring the queue's retry tiers, dead-letter "
        "exchange and DLQ again"
    )
    runs = [run for run in checker.records.runs("start") if run.key in poison]
    assert len(runs) == 2 * len(poison), "each poison message ran max_attempts times"


def test_no_declare_worker_keeps_messages_whose_dlq_is_gone(checker: Checker) -> None:
    # Given a --no-declare worker on a quorum queue whose DLQ is deleted under it
    checker.write_topology(queue_type="quorum", retry="false", crash_limit=2)
    checker.declare()
    worker = checker.start_worker("--no-declare", sleep=0.0)
    checker.rabbit.admin.delete_queue(checker.vhost, "work.dlq")

    # When three messages are rejected by their handler for 6 s
    checker.feed(3, rate=100, body=lambda n: job(n, action="fail"))
    time.sleep(6)

    # Then each ran once (a message due for the DLQ is not run again) and the worker backs off
    # instead of looping; the messages wait in the work queue (past the delivery limit the
    # broker's own dead-lettering is at-least-once, so they stay there too)
    runs = checker.records.runs("start")
    assert len(runs) == 3, f"{len(runs)} handler runs in 6 s"
    assert worker.has_event(
        "the dead-letter exchange 'dlx' or the DLQ bound to it for 'work' is missing on the broker"
        " and this worker does not declare (--no-declare): run `rabbitflow topology declare`; "
        "failed messages stay in their queue until then"
    )

    # and once an operator declares the topology again, they reach the DLQ
    checker.declare()
    checker.drain(restart=False)
    report = checker.report("DLQ deleted under --no-declare (quorum)", 1, duplicate_bound=0)
    report.check()
    assert len(checker.dead) == 3


def test_a_publisher_set_origin_is_overwritten_on_the_first_failure(checker: Checker) -> None:
    # Given a message whose publisher forged rabbitflow's origin headers
    checker.write_topology(retry="false")
    checker.start_worker()
    forged = aio_pika.Message(
        job(1, action="reject"),
        message_id="forged",
        headers={
            "rabbitflow-origin-queue": "payments",
            "rabbitflow-first-failed-at": "1999-01-01T00:00:00Z",
            "rabbitflow-replay-count": 7,
        },
    )

    # When it fails
    checker.publish([forged])
    checker.drain()

    # Then its DLQ copy says where and when it really failed
    [dead] = checker.dead
    assert header_text(dead.headers["rabbitflow-origin-queue"]) == "work"
    first = datetime.fromisoformat(header_text(dead.headers["rabbitflow-first-failed-at"]))
    assert datetime.now(UTC) - first < timedelta(minutes=5)
    assert "rabbitflow-replay-count" not in dead.headers
    checker.report("forged origin headers", 0, duplicate_bound=0).check()


def test_a_far_future_not_before_is_dead_lettered_not_bounced(checker: Checker) -> None:
    # Given a message published with a not-before a year ahead
    checker.write_topology(retry='{ delays = ["100ms", "1s"] }')
    checker.start_worker("--log-level", "debug")
    ahead = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    checker.publish(
        [aio_pika.Message(job(1), message_id="late", headers={"rabbitflow-not-before": ahead})]
    )

    # Then it goes to the DLQ at once, saying why, and never runs
    checker.drain()
    [dead] = checker.dead
    assert header_text(dead.headers["rabbitflow-dead-letter-reason"]) == "not_before_out_of_range"
    assert "DeferralOutOfRange" in header_text(dead.headers["rabbitflow-error-type"])
    assert checker.records.runs("start") == []
    checker.report("not-before a year ahead", 0, duplicate_bound=0).check()


def test_sigterm_while_the_broker_blocks_the_connection_exits_in_time(
    chaos_checker: Checker, chaos_node: ChaosNode
) -> None:
    # Given a worker on the chaos node with handlers in flight
    checker = chaos_checker
    checker.write_topology(prefetch=5)
    worker = checker.start_worker("--shutdown-timeout", "3", sleep=30.0)
    checker.feed(5, rate=100)
    checker.records.wait_for("start", 5, timeout=10)

    # When a memory alarm blocks every connection and the worker gets SIGTERM
    try:
        chaos_node.set_memory_watermark(0.0000001)
        wait_until(lambda: "memory" in chaos_node.alarms(), 15, "the memory alarm")
        code, took = worker.stop(timeout=20)
    finally:
        chaos_node.set_memory_watermark(0.4)
    wait_until(lambda: "memory" not in chaos_node.alarms(), 15, "the alarm to clear")

    # Then it leaves within the shutdown timeout plus the documented grace
    print(f"RELIABILITY SIGTERM under a memory alarm: exit {code} after {took:.1f} s")
    assert took < 3 + DRAIN_GRACE + 1, took
    # and the unfinished messages are redelivered to the next worker: nothing lost
    checker.drain(sleep=0.0)
    checker.report("SIGTERM while blocked by a memory alarm", 1, duplicate_bound=0).check()


# -- a server that accepts and resets ------------------------------------------------------------


@pytest.fixture
def resetting_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts every connection and resets it at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # SO_LINGER 0: close() sends RST, what a load balancer with no backend does.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(2)


async def test_connect_to_a_server_that_resets_fails_fast(resetting_server: int) -> None:
    started = time.monotonic()
    with pytest.raises(UnreachableBrokerError):
        await asyncio.wait_for(connect(f"amqp://guest:guest@127.0.0.1:{resetting_server}/"), 15)
    assert time.monotonic() - started < 12


def test_a_worker_against_a_resetting_server_stops_on_sigterm(
    checker: Checker, resetting_server: int
) -> None:
    # Given a worker whose broker address accepts and resets (its first start retries)
    checker.write_topology()
    url = f"amqp://guest:guest@127.0.0.1:{resetting_server}/"
    worker = checker.start_worker(url=url, wait_ready=False)
    worker.wait_for_event("broker unreachable; retrying", timeout=20)
    # When it gets SIGTERM, it stops: it neither spins on the error nor ignores the signal
    _, took = worker.stop(timeout=15)
    assert took < 12, took


# -- the publisher channel --------------------------------------------------------------------


async def test_concurrent_publishes_to_a_missing_exchange_keep_the_connection(
    checker: Checker,
) -> None:
    # Given a publisher with 50 publishes in flight, half to an exchange that does not exist
    connection = await aiormq.connect(checker.url)
    publisher = await Publisher.open(connection)

    async def one(n: int) -> str:
        exchange = "no-such-exchange" if n % 2 else ""
        try:
            await publisher.send(
                exchange, "nowhere", b"x", spec.Basic.Properties(), mandatory=False
            )
        except PublishError as exc:
            return "missing" if exc.missing else "failed"
        return "ok"

    try:
        for _ in range(3):
            results = await asyncio.gather(*(one(n) for n in range(50)))
            assert "missing" in results
        # Then the 404s closed only the publisher channel, never the connection
        await asyncio.sleep(0.3)
        assert not connection.is_closed
        assert await one(0) == "ok"
    finally:
        await connection.close()


def test_sigterm_on_a_half_open_connection_exits_in_time(checker: Checker) -> None:
    # Given a worker behind a TCP proxy, long handlers in flight, no heartbeat to notice
    checker.write_topology(prefetch=5)
    with ChaosProxy(urlsplit(checker.url).port or 5672) as proxy:
        url = proxy.url(checker.url)
        worker = checker.start_worker("--shutdown-timeout", "2", sleep=30.0, url=url)
        checker.feed(5, rate=100)
        checker.records.wait_for("start", 5, timeout=10)

        # When the connection goes half-open (the proxy drops every byte) and SIGTERM comes
        assert proxy.stall() == 1
        code, took = worker.stop(timeout=20)

    # Then the worker leaves within the shutdown timeout plus the documented grace
    print(f"RELIABILITY SIGTERM on a half-open connection: exit {code} after {took:.1f} s")
    assert took < 2 + DRAIN_GRACE + 1, took
    # and the broker requeues the unacked messages for the next worker: nothing lost
    checker.drain(sleep=0.0)
    checker.report("SIGTERM on a half-open connection", 1, duplicate_bound=0).check()
