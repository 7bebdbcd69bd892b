"""Faults injected while ``rabbitflow run`` consumes: nothing confirmed may be lost.

Each test runs the worker as a subprocess on its own vhost, publishes numbered messages with
confirms while it injects the fault, then lets :class:`~tests.reliability.checker.Checker`
drain the queues and count lost, unexpected and duplicated messages (``-s`` prints the
``RELIABILITY`` lines that ``docs/reliability.md`` quotes).
"""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from rabbitflow import App, UnroutableError
from tests.reliability.chaos_node import CONSUMER_TIMEOUT_MS, ChaosNode
from tests.reliability.checker import SYNC_APP, Checker, Run, death_reasons, header_text, job
from tests.reliability.proxy import ChaosProxy
from tests.support.broker import Rabbit
from tests.support.processes import run_cli
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.chaos, pytest.mark.nodes]


def test_kill_9_three_times(checker: Checker) -> None:
    # Given a worker on a quorum queue (the default type) with prefetch 20
    prefetch = 20
    checker.write_topology(queue_type="quorum", prefetch=prefetch)
    checker.start_worker(sleep=0.005)

    # When 3,000 messages arrive over 12 s and the worker is killed with SIGKILL three times
    feeder = checker.feed(3000, rate=250)
    for _ in range(3):
        time.sleep(2)
        checker.kill_worker()
        checker.start_worker(sleep=0.005)
    assert feeder.running, "the faults must strike while messages are still arriving"

    # Then every confirmed message was processed, with at most one window of duplicates per kill
    checker.drain(sleep=0.005)
    report = checker.report("kill -9 x3", faults=3, duplicate_bound=prefetch * 3)
    report.check()
    assert report.redelivered_runs > 0, "the kills never caught a delivery in hand"


def test_sigterm_lets_two_second_handlers_finish(checker: Checker) -> None:
    # Given ten 2 s handlers in flight and a 5 s shutdown timeout
    prefetch = 10
    checker.write_topology(prefetch=prefetch)
    worker = checker.start_worker("--shutdown-timeout", "5", sleep=2.0)
    checker.feed(300, rate=1000)
    checker.records.wait_for("start", prefetch, timeout=10)

    # When the worker gets SIGTERM
    code, took = worker.stop(timeout=10)

    # Then it exits 0 once they finished (about 2 s), every one of them done and acked
    print(f"RELIABILITY SIGTERM with 2 s handlers: exit {code} after {took:.1f} s")
    assert code == 0, worker.output()[-3000:]
    assert took < 3.5, took
    in_hand = [run.key for run in checker.records.runs("start") if run.pid == worker.pid]
    done = [run.key for run in checker.records.runs("done") if run.pid == worker.pid]
    assert len(in_hand) == prefetch
    assert sorted(done) == sorted(in_hand)
    # and the next worker processes the rest: nothing lost, nothing twice
    checker.drain(sleep=0.0)
    checker.report("SIGTERM, 2 s handlers, --shutdown-timeout 5", 1, duplicate_bound=0).check()


def test_sigterm_past_the_shutdown_timeout_requeues(checker: Checker) -> None:
    # Given five 30 s handlers in flight and a 2 s shutdown timeout
    checker.write_topology(prefetch=10)
    worker = checker.start_worker("--shutdown-timeout", "2", sleep=30.0)
    checker.feed(5, rate=100)
    checker.records.wait_for("start", 5, timeout=10)

    # When the worker gets SIGTERM
    code, took = worker.stop(timeout=10)

    # Then it exits 0 about 2 s later, the messages back in the queue, the DLQ empty
    print(f"RELIABILITY SIGTERM with 30 s handlers: exit {code} after {took:.1f} s")
    assert code == 0, worker.output()[-3000:]
    assert 1.5 < took < 4.0, took
    assert worker.has_event("shutdown timeout reached; unfinished messages go back to the queue")
    counts = checker.counts()
    assert (counts["work"], counts["work.dlq"]) == (5, 0), counts
    # and the next worker gets them again, flagged redelivered, and processes them once
    checker.drain(sleep=0.0)
    report = checker.report("SIGTERM, 30 s handler, --shutdown-timeout 2", 1, duplicate_bound=0)
    report.check()
    assert report.redelivered_runs == 5


def _reconnections(checker: Checker) -> int:
    return sum(1 for event in checker.worker.events() if event.get("event") == "reconnected")


def _wait_reconnections(checker: Checker, count: int) -> None:
    wait_until(lambda: _reconnections(checker) >= count, 20, f"reconnection {count}")


def _event(checker: Checker, name: str) -> dict[str, Any]:
    return next(e for e in checker.worker.events() if e.get("event") == name)


def test_broker_closes_the_connection_five_times(checker: Checker) -> None:
    # Given a worker with prefetch 20 and messages arriving for 15 s
    prefetch = 20
    checker.write_topology(queue_type="quorum", prefetch=prefetch)
    checker.start_worker(sleep=0.005)
    feeder = checker.feed(3000, rate=200)

    # When the broker closes the worker's connection five times (this vhost's only)
    for closed in range(1, 6):
        time.sleep(0.5)
        assert checker.close_worker_connections() == 1
        _wait_reconnections(checker, closed)
    assert feeder.running

    # Then the worker reconnected each time and nothing was lost
    checker.drain(sleep=0.005)
    checker.report("close_connection x5", 5, duplicate_bound=prefetch * 5).check()
    assert len(checker.workers) == 1, "the worker recovered in process, without a restart"


def test_proxy_cuts_every_connection(checker: Checker) -> None:
    # Given a worker connected through a TCP proxy
    prefetch = 20
    checker.write_topology(prefetch=prefetch)
    with ChaosProxy(5672) as proxy:
        url = proxy.url(checker.url)
        checker.start_worker(sleep=0.005, url=url)
        feeder = checker.feed(3000, rate=250)

        # When the proxy cuts the connection three times
        for cut in range(1, 4):
            time.sleep(2.0)
            assert proxy.cut() >= 1
            _wait_reconnections(checker, cut)
        assert feeder.running

        # Then nothing was lost
        checker.drain(sleep=0.005, url=url)
    checker.report("TCP proxy cuts the connection x3", 3, duplicate_bound=prefetch * 3).check()
    assert len(checker.workers) == 1


def test_proxy_stops_forwarding_and_heartbeats_notice(checker: Checker) -> None:
    # Given a worker with a 2 s heartbeat, connected through a TCP proxy
    prefetch = 20
    checker.write_topology(prefetch=prefetch)
    with ChaosProxy(5672) as proxy:
        url = proxy.url(checker.url)
        worker = checker.start_worker("--heartbeat", "2", sleep=0.005, url=url)
        checker.feed(1500, rate=100)

        # When the proxy silently drops every byte of that connection (no close, no RST)
        time.sleep(2.0)
        stalled = time.monotonic()
        assert proxy.stall() == 1

        # Then the missed heartbeats reveal it within about 10 s and the worker reconnects
        worker.wait_for_event("connection to the broker lost; reconnecting", timeout=20)
        noticed = time.monotonic() - stalled
        worker.wait_for_event("reconnected", timeout=20)
        print(f"RELIABILITY stalled connection noticed after {noticed:.1f} s")
        assert noticed < 13.0, noticed
        checker.drain(sleep=0.005, url=url)
    checker.report("TCP proxy stops forwarding, heartbeat 2 s", 1, prefetch).check()


def test_sync_handler_blocking_ten_seconds_keeps_the_connection(checker: Checker) -> None:
    # Given a sync worker with a 2 s heartbeat and four handlers that block for 10 s
    checker.write_topology(prefetch=4)
    worker = checker.start_worker("--heartbeat", "2", target=SYNC_APP, sleep=0.0)
    connections = checker.worker_connections()
    checker.feed(4, rate=100, body=lambda n: job(n, sleep=10))
    checker.feed(200, rate=100, first=4)

    # When they block, Then the connection survives (heartbeats flow from the event loop)
    checker.records.wait_for("done", 204, timeout=30)
    assert checker.worker_connections() == connections
    assert not worker.has_event("connection to the broker lost; reconnecting")
    checker.drain(target=SYNC_APP)
    checker.report("sync handler blocks 10 s, heartbeat 2 s", 0, duplicate_bound=0).check()


# -- on the private chaos node ------------------------------------------------------------------


def test_broker_stop_and_start(chaos_checker: Checker, chaos_node: ChaosNode) -> None:
    # Given a worker on the chaos node with messages arriving for 15 s
    prefetch = 20
    checker = chaos_checker
    checker.write_topology(queue_type="quorum", prefetch=prefetch)
    checker.start_worker(sleep=0.005)
    feeder = checker.feed(3000, rate=200)

    # When RabbitMQ stops for 3 s and starts again, twice
    for _ in range(2):
        time.sleep(2.0)
        chaos_node.stop_app()
        time.sleep(3.0)
        chaos_node.start_app()
    assert feeder.running or feeder.failed

    # Then the worker reconnected and every confirmed message was processed
    checker.drain(sleep=0.005, timeout=120)
    report = checker.report("broker stop_app/start_app x2", 2, duplicate_bound=prefetch * 2)
    report.check()
    assert checker.worker.has_event("reconnected")
    assert len(checker.workers) == 1


def test_handler_timeout_below_consumer_timeout_retries(
    chaos_checker: Checker, chaos_node: ChaosNode
) -> None:
    # Given the chaos node's consumer_timeout of 5 s and a handler timeout of 2 s
    assert CONSUMER_TIMEOUT_MS == 5000
    checker = chaos_checker
    checker.write_topology(prefetch=5, timeout="2s")
    worker = checker.start_worker(sleep=0.005)

    # When a handler would run 8 s on its first delivery, among 200 quick ones
    checker.feed(1, rate=10, body=lambda n: job(n, sleep_first=8))
    checker.feed(200, rate=100, first=1)

    # Then the timeout sends it to a retry tier at 2 s, before the broker's limit, and its
    # second attempt succeeds: no channel was closed, nothing lost
    checker.drain()
    report = checker.report("handler timeout 2 s < consumer_timeout 5 s", 0, duplicate_bound=0)
    report.check()
    slow = [run for run in checker.records.runs("start") if run.key == "0"]
    assert [run.attempt for run in slow] == [1, 2]
    gap = slow[1].at - slow[0].at
    print(f"RELIABILITY handler timeout: attempt 2 started {gap:.1f} s after attempt 1")
    assert gap < 4.0
    assert not worker.has_event("connection to the broker lost; reconnecting")


def test_consumer_timeout_closes_the_channel_and_the_worker_recovers(
    chaos_checker: Checker, chaos_node: ChaosNode
) -> None:
    # Given the chaos node's consumer_timeout of 5 s and no handler timeout
    checker = chaos_checker
    prefetch = 5
    checker.write_topology(prefetch=prefetch)
    worker = checker.start_worker(sleep=0.005)

    # When a handler runs 8 s on its first delivery, among 200 quick ones
    checker.feed(1, rate=10, body=lambda n: job(n, sleep_first=8))
    checker.feed(200, rate=100, first=1)

    # Then the broker closes the channel (PRECONDITION_FAILED), the worker reconnects, the
    # message comes back redelivered and is processed; nothing is lost
    worker.wait_for_event("connection to the broker lost; reconnecting", timeout=20)
    lost = _event(checker, "connection to the broker lost; reconnecting")
    assert "PRECONDITION_FAILED" in str(lost.get("error")), lost
    worker.wait_for_event("reconnected", timeout=20)
    checker.drain()
    report = checker.report("consumer_timeout 5 s exceeded", 1, duplicate_bound=prefetch)
    report.check()
    slow = [run for run in checker.records.runs() if run.key == "0"]
    closed = datetime.fromisoformat(lost["timestamp"]).timestamp() - slow[0].at
    print(f"RELIABILITY consumer_timeout: channel closed {closed:.1f} s after the delivery")
    assert [(run.phase, run.redelivered) for run in slow] == [
        ("start", False),
        ("start", True),
        ("done", True),
    ]


def test_memory_alarm_blocks_publishing_and_nothing_is_lost(
    chaos_checker: Checker, chaos_node: ChaosNode
) -> None:
    # Given a worker on the chaos node and messages arriving for 8 s
    checker = chaos_checker
    checker.write_topology(prefetch=10)
    checker.start_worker(sleep=0.005)
    feeder = checker.feed(800, rate=100)
    time.sleep(1.5)

    # When a memory alarm goes off
    try:
        chaos_node.set_memory_watermark(0.0000001)
        wait_until(lambda: "memory" in chaos_node.alarms(), 15, "the memory alarm")
        # Then publishing is blocked: no confirm arrives while the alarm lasts
        time.sleep(1.0)
        blocked_at = feeder.confirmed_count()
        time.sleep(3.0)
        during = feeder.confirmed_count() - blocked_at
        # and the worker still consumes what the queue held
        wait_until(
            lambda: len(checker.records.done()) >= blocked_at, 15, "the backlog to be consumed"
        )
    finally:
        chaos_node.set_memory_watermark(0.4)
    wait_until(lambda: "memory" not in chaos_node.alarms(), 15, "the alarm to clear")

    # and once it clears, everything is published and processed: nothing lost
    checker.drain()
    report = checker.report("memory alarm (publishers blocked)", 1, duplicate_bound=0)
    report.check()
    print(f"RELIABILITY memory alarm: {during} confirms during 3 s of alarm")
    assert during == 0
    assert report.confirmed == 800


# -- topology drift -------------------------------------------------------------------------------


async def _declare_queue(url: str, name: str, arguments: dict[str, Any]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments=arguments)
    finally:
        await connection.close()


def test_a_queue_declared_with_other_arguments_stops_run(checker: Checker) -> None:
    # Given the queue "work" already on the broker with a length limit the topology lacks
    checker.write_topology()
    arguments = {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "dlx",
        "x-dead-letter-routing-key": "work",
        "x-max-length": 1000,
    }
    asyncio.run(_declare_queue(checker.url, "work", arguments))

    # When the worker starts
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker = checker.start_worker(wait_ready=False)
    code = worker.wait(15)
    took = time.monotonic() - worker.started_at
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    # Then it exits 1 within 5 s naming the argument, without a traceback or a busy loop
    output = worker.output()
    assert code == 1, output
    assert took < 5.0, took
    assert cpu < 4.0, cpu
    assert "Traceback" not in output
    assert "x-max-length" in output, output
    print(f"RELIABILITY topology drift: exit {code} after {took:.1f} s, {cpu:.1f} s CPU")


def test_a_queue_deleted_while_running_is_declared_again(checker: Checker) -> None:
    # Given a worker that processed a first batch
    checker.write_topology(prefetch=10)
    worker = checker.start_worker(sleep=0.002)
    checker.feed(300, rate=300)
    checker.records.wait_for("done", 300, timeout=20)

    # When its queue is deleted behind its back
    checker.rabbit.admin.delete_queue(checker.vhost, "work")

    # Then the broker cancels the consumer, the worker reconnects and declares the queue again,
    # and consumes what is published afterwards
    worker.wait_for_event("consumer cancelled by the broker; reconnecting", timeout=15)
    worker.wait_for_event("reconnected", timeout=15)
    checker.feed(300, rate=300, first=300)
    checker.drain()
    checker.report("work queue deleted while running", 1, duplicate_bound=0).check()
    assert len(checker.workers) == 1


# -- poison messages -----------------------------------------------------------------------------


def test_an_always_failing_message_is_dead_lettered_after_max_attempts(checker: Checker) -> None:
    # Given 3 attempts with tiers of 100 ms and 200 ms
    checker.write_topology(retry='{ delays = ["100ms", "200ms"], max_attempts = 3 }')
    checker.start_worker(sleep=0.002)

    # When five of 500 messages always fail
    poison = {"50", "150", "250", "350", "450"}

    def body(n: int) -> bytes:
        return job(n, action="fail") if str(n) in poison else job(n)

    checker.feed(500, rate=250, body=body)
    checker.drain()

    # Then each ran exactly 3 times and sits in the DLQ saying why; the others were processed
    report = checker.report("poison message (always fails), max_attempts 3", 0, 0)
    report.check()
    runs = [(run.key, run.attempt) for run in checker.records.runs("start") if run.key in poison]
    assert sorted(runs) == sorted((key, attempt) for key in poison for attempt in (1, 2, 3))
    assert {message.message_id for message in checker.dead} == poison
    for message in checker.dead:
        assert message.headers["rabbitflow-attempt"] == 3
        assert header_text(message.headers["rabbitflow-error-type"]) == "RuntimeError"
    assert report.processed == 495


def test_a_message_that_kills_the_worker_is_parked_by_the_delivery_limit(
    checker: Checker,
) -> None:
    # Given a quorum queue with crash_limit 3 and prefetch 1 (only the poison message in hand)
    checker.write_topology(queue_type="quorum", prefetch=1, crash_limit=3)
    checker.start_worker()

    # When one of 41 messages makes the handler call os._exit
    checker.feed(41, rate=200, body=lambda n: job(n, action="exit") if n == 20 else job(n))
    crashes = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and crashes < 10:
        if not checker.worker_alive():
            assert checker.worker.wait(5) == 3, checker.worker.output()[-2000:]
            crashes += 1
            checker.start_worker(wait_ready=False)  # it may die before it logs "consuming"
        elif len(checker.records.done()) == 40 and checker.counts()["work"] == 0:
            break
        time.sleep(0.2)

    # Then the worker died crash_limit + 1 times, then the broker dead-lettered the message
    checker.drain()
    report = checker.report("poison message (os._exit), quorum crash_limit 3", crashes, 0)
    report.check()
    assert crashes == 4
    [dead] = checker.dead
    assert dead.message_id == "20"
    assert death_reasons(dead.headers) == ["delivery_limit"]
    assert report.processed == 40


# -- resources -----------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _max_concurrency(runs: list[Run]) -> int:
    """The most handler runs in progress at once, from the start and done records."""
    edges = sorted([(run.at, 1 if run.phase == "start" else -1) for run in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_backlog_of_large_messages_stays_within_prefetch(
    chaos_checker: Checker, chaos_node: ChaosNode
) -> None:
    # Given 5,000 messages of 64 KiB (320 MiB) waiting in the queue
    checker = chaos_checker
    prefetch = 16
    checker.write_topology(prefetch=prefetch)
    checker.declare()
    pad = "x" * (64 * 1024 - 40)
    checker.feed(5000, rate=5000, body=lambda n: job(n, pad=pad)).join(120)

    # When a worker with a slow handler (20 ms) works through it
    worker = checker.start_worker(sleep=0.02)
    checker.records.wait_for("done", 100, timeout=30)
    baseline = peak = _rss_kib(worker.pid)
    unacked: list[int] = []
    while len(checker.records.done()) < 5000 and worker.process and worker.process.poll() is None:
        peak = max(peak, _rss_kib(worker.pid))
        rows = chaos_node.rabbit.list(checker.vhost, "queues", "name", "messages_unacknowledged")
        unacked += [int(count) for name, count in rows if name == "work"]
        time.sleep(0.2)

    # Then the broker never had more than prefetch messages out, the handlers never ran more
    # than prefetch at once, and the worker's memory stayed flat
    checker.drain(sleep=0.02)
    report = checker.report("backlog 5,000 x 64 KiB, slow handler", 0, duplicate_bound=0)
    report.check()
    growth = (peak - baseline) / 1024
    concurrency = _max_concurrency(checker.records.runs())
    print(
        f"RELIABILITY backlog: max unacked {max(unacked)} over {len(unacked)} samples, "
        f"max concurrent handlers {concurrency}, prefetch {prefetch}, RSS {baseline / 1024:.0f} "
        f"MiB -> peak {peak / 1024:.0f} MiB (+{growth:.1f} MiB)"
    )
    assert unacked
    assert max(unacked) <= prefetch
    assert concurrency <= prefetch
    assert growth < 50, growth


# -- least privilege --------------------------------------------------------------------------


@pytest.fixture
def app_user(rabbit: Rabbit, vhost: str) -> Iterator[tuple[str, str]]:
    """A user with read and write but no configure permission on the test's vhost."""
    name, password = f"rf-app-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbit.admin.add_user(name, password)
    try:
        rabbit.admin.set_permissions(vhost, name, "^$", ".*", ".*")
        yield name, password
    finally:
        rabbit.forget_user(name)


def test_least_privilege_user_runs_with_no_declare(
    checker: Checker, app_user: tuple[str, str]
) -> None:
    # Given the topology declared by an admin and a user without configure permission
    prefetch = 10
    checker.write_topology(prefetch=prefetch)
    checker.declare()
    name, password = app_user
    url = checker.url.replace("guest:guest@", f"{name}:{password}@")

    # When that user runs the worker with --no-declare and its connection is closed 5 times
    worker = checker.start_worker("--no-declare", sleep=0.005, url=url)
    assert worker.has_event("topology verified (--no-declare)")
    checker.feed(2000, rate=200, url=url)
    for closed in range(1, 6):
        time.sleep(0.5)
        assert checker.close_worker_connections() == 1
        _wait_reconnections(checker, closed)

    # Then it verified the topology after each reconnection and nothing was lost
    checker.drain(sleep=0.005, url=url)
    report = checker.report("least-privilege user, --no-declare, close_connection x5", 5, 50)
    report.check()
    assert len(checker.workers) == 1

    # and declaring with that user fails with one clear line naming the missing permission
    result = run_cli("topology", "declare", str(checker.topology), "--url", url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "ACCESS_REFUSED" in errors[0] or "lacks configure permission" in errors[0], errors
    assert password not in result.stderr + result.stdout
    print(f"RELIABILITY declare without configure permission: {errors[0]}")


# -- publishing -----------------------------------------------------------------------------------


async def test_unroutable_publish_raises(checker: Checker) -> None:
    # Given the topology declared and an App publishing on its own connection
    checker.declare()
    app = App(topology=checker.topology, url=checker.url, name="rf-reliability-publisher")
    try:
        # When a message is published with a routing key no queue is bound to
        # Then publish raises UnroutableError instead of returning as if it were delivered
        with pytest.raises(UnroutableError):
            await app.publish("jobs", "nowhere", {"id": 1}, message_id="unroutable")
        # and the next publish on the same connection works
        await app.publish("jobs", "work", {"id": 2}, message_id="2")
    finally:
        await app.close()
    assert (await asyncio.to_thread(checker.counts))["work"] == 1
