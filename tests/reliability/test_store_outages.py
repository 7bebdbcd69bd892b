"""Outages of rabbitflow's own store under an idempotent consumer: no attempt spent.

A worker consumes ``work`` with ``idempotent=True`` while the store goes away for 10 s under
a steady stream of messages: a private ``redis-server`` killed by its pid, or the TCP proxy
process in front of PostgreSQL killed by its pid (the shared Redis and PostgreSQL are never
touched). The consumer pauses while the store does not answer, the messages it held wait
(deferred, attempt unspent), and consumption resumes when the store answers. The checker
then counts: nothing in the DLQ, nothing lost, each message handled exactly once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.checker import DLQ, Checker, Report
from tests.reliability.stores import SPACE_ENV, STORE_ENV, PostgresProxy, PrivateRedis
from tests.support.processes import WorkerProcess
from tests.support.services import drop_table, require_postgres
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.chaos]

STORE_APP = "tests.reliability.store_app:app"
PAUSED = "store unavailable; consuming paused until it answers"
RESUMED = "store answers again; consuming resumed"
OUTAGE = 10.0
DEADLINE = 2.0  # the stores' default timeout
PREFETCH = 20


@pytest.fixture
def redis_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateRedis]:
    """A private Redis (not started yet) that the worker's store uses, under a fresh prefix."""
    server = PrivateRedis(tmp_path / "redis.log")
    use_store(monkeypatch, server.url, f"rf-outage:{uuid.uuid4().hex[:10]}:")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PostgresProxy]:
    """A proxy process (not started yet) in front of the shared PostgreSQL, that the worker's
    store goes through, with a table of its own (dropped afterwards)."""
    proxy = PostgresProxy(tmp_path / "proxy.log")
    table = f"rf_outage_{uuid.uuid4().hex[:10]}"
    use_store(monkeypatch, proxy.url, table)
    try:
        yield proxy
    finally:
        proxy.close()
        asyncio.run(drop_table(require_postgres(), table))


def use_store(monkeypatch: pytest.MonkeyPatch, url: str, space: str) -> None:
    # The worker subprocess inherits the environment: store_app builds its store from it.
    monkeypatch.setenv(STORE_ENV, url)
    monkeypatch.setenv(SPACE_ENV, space)


def events(checker: Checker, name: str) -> list[dict[str, Any]]:
    return [e for w in checker.workers for e in w.events() if e.get("event") == name]


def outage_under_load(checker: Checker, fault: str, take_down: Any, bring_back: Any) -> Report:
    """1,500 messages at 100/s; 3 s in, the store goes for OUTAGE seconds."""
    checker.write_topology(queue_type="quorum", prefetch=PREFETCH)
    checker.start_worker(target=STORE_APP, sleep=0.002)
    feeder = checker.feed(1500, rate=100)
    time.sleep(3)
    take_down()
    time.sleep(OUTAGE)
    bring_back()
    assert feeder.running, "the outage must end while messages are still arriving"
    checker.drain(target=STORE_APP, sleep=0.002)
    return checker.report(f"{fault} for {OUTAGE:g} s", faults=1, duplicate_bound=0)


def assert_handled_once_after_one_pause(checker: Checker, report: Report) -> None:
    report.check()
    assert report.dead_lettered == 0, report.line()
    assert report.processed == report.confirmed, report.line()
    assert report.duplicates == 0, report.line()
    paused, resumed = events(checker, PAUSED), events(checker, RESUMED)
    assert len(paused) == 1, paused
    assert paused[0]["queues"] == ["work"]
    assert len(resumed) == 1, resumed
    # Counted from the failure that paused it: a hung store is noticed after its deadline.
    assert OUTAGE - DEADLINE - 1 <= resumed[0]["outage_s"] <= OUTAGE + 5, resumed
    # Nothing went through the DLQ path: no attempt was spent on the store.
    assert not events(checker, "message dead-lettered")
    assert not events(checker, "retry scheduled")


def test_a_ten_second_redis_outage_dead_letters_nothing(
    checker: Checker, redis_store: PrivateRedis
) -> None:
    # Given an idempotent consumer on a private Redis, and messages arriving at 100/s
    redis_store.start()

    # When Redis is killed (by pid) for 10 s and started again
    report = outage_under_load(checker, "Redis killed", redis_store.kill, redis_store.start)

    # Then nothing was dead-lettered or lost, and each message was handled once
    assert_handled_once_after_one_pause(checker, report)


def test_a_ten_second_postgres_outage_dead_letters_nothing(
    checker: Checker, postgres_store: PostgresProxy
) -> None:
    # Given an idempotent consumer on PostgreSQL through a proxy process
    postgres_store.start()

    # When the proxy is killed (by pid) for 10 s, every connection dropped and new ones
    # refused, then started again
    report = outage_under_load(checker, "PostgreSQL cut", postgres_store.kill, postgres_store.start)

    # Then nothing was dead-lettered or lost, and each message was handled once
    assert_handled_once_after_one_pause(checker, report)


def test_a_hung_redis_pauses_within_the_deadline_and_dead_letters_nothing(
    checker: Checker, redis_store: PrivateRedis
) -> None:
    # Given an idempotent consumer on a private Redis
    redis_store.start()

    # When Redis hangs (SIGSTOP: connections stay open, nothing answers) for 10 s
    report = outage_under_load(checker, "Redis hung", redis_store.stop, redis_store.cont)

    # Then the consumer paused on the store's deadline and nothing was dead-lettered
    assert_handled_once_after_one_pause(checker, report)


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_store_unreachable_at_start_holds_the_consumer_until_it_answers(
    kind: str, checker: Checker, request: pytest.FixtureRequest
) -> None:
    # Given a worker whose store is not there when it starts
    server: PrivateRedis | PostgresProxy = request.getfixturevalue(f"{kind}_store")
    checker.write_topology(queue_type="quorum", prefetch=PREFETCH)
    worker: WorkerProcess = checker.start_worker(target=STORE_APP)

    # Then it says so at start: a warning, and the summary shows the store not answering
    (paused,) = events(checker, PAUSED)
    assert paused["queues"] == ["work"]
    summary = next(e for e in worker.events() if e.get("event") == "startup summary")
    (store,) = summary["stores"]
    assert store["queues"] == ["work"]
    assert store["answer_ms"] is None, store

    # And while it does not answer, nothing is consumed: the messages wait in the queue
    feeder = checker.feed(300, rate=150)
    feeder.join(30)
    time.sleep(2)
    assert checker.records.count("start") == 0
    counts = checker.counts()
    assert counts["work"] == 300, counts
    assert counts[DLQ] == 0, counts

    # When the store comes, the consumer resumes and handles each message once
    server.start()
    wait_until(lambda: checker.records.count("done") >= 300, 20, "300 messages handled")
    checker.drain(target=STORE_APP)
    report = checker.report(f"{kind} unreachable at start", faults=1, duplicate_bound=0)
    report.check()
    assert report.dead_lettered == 0, report.line()
    assert report.processed == 300, report.line()
    assert len(events(checker, RESUMED)) == 1
