"""Retries, dead-lettering, crash loops and the circuit breaker against a real RabbitMQ.

Each test gets its own vhost, writes its topology into ``tmp_path`` and runs the worker in the
test's event loop (the crash-loop test runs ``rabbitflow run`` in a subprocess instead).
Times are measured on the handler side with ``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiormq
import pytest
from pydantic import BaseModel

from rabbitflow import Message, Reject, Retry
from tests.support.amqp import declare_topology, publish_many
from tests.support.amqp import drain_async as drain
from tests.support.amqp import message_counts_async as ready_counts
from tests.support.amqp import publish_one as publish
from tests.support.broker import Rabbit
from tests.support.broker import queue_messages as depths
from tests.support.output import text
from tests.support.processes import Workers, run_cli
from tests.support.records import Runs
from tests.support.topology import app_for
from tests.support.waiting import eventually, wait_for
from tests.support.worker import running

pytestmark = [pytest.mark.broker]

ORDERS = """
[exchanges.orders]
type = "topic"
"""


class PaymentDeclinedError(Exception):
    """A failure of the user's own code (its qualified name lands in the DLQ headers)."""


def _fail_deep(depth: int, message: str) -> None:
    # A chain of ``depth`` exceptions, each with a huge message: the traceback is far over the
    # 8 KiB header limit, and so is each exception line in it.
    if depth:
        try:
            _fail_deep(depth - 1, message)
        except PaymentDeclinedError as exc:
            raise PaymentDeclinedError(f"level {depth}: {message}") from exc
    raise PaymentDeclinedError(message)


def _death_count(headers: dict[str, Any]) -> int:
    """Sum of the broker's ``x-death`` counts on a message (0 when it has none)."""
    return sum(int(entry.get("count", 0)) for entry in headers.get("x-death") or [])


@pytest.mark.slow
async def test_tiers_time_the_attempts_and_the_dlq_copy_carries_every_header(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a queue with tiers 1s, 2s and 3 attempts, and a handler that always fails
    app = app_for(
        tmp_path,
        ORDERS
        + """
[queues.pay]
bindings = [{ exchange = "orders", routing_key = "order.created" }]
retry = { delays = ["1s", "2s"], max_attempts = 3 }
""",
    )
    runs = Runs()
    huge = "declined: " + "é" * 50_000  # 100 KB of UTF-8 in the exception message
    wall_first: list[float] = []

    @app.consumer("pay")
    async def pay(message: Message) -> None:
        runs.add(message)
        if message.attempt == 1:
            wall_first.append(time.time())
        if message.attempt < 3:
            raise PaymentDeclinedError("card declined")
        _fail_deep(30, huge)

    # When one message is published
    async with running(app, vhost_url):
        await publish(
            vhost_url,
            "orders",
            "order.created",
            b'{"order_id": 1}',
            message_id="m-1",
            correlation_id="c-1",
            headers={"tenant": "acme", "traceparent": "00-abc-def-01"},
        )
        await wait_for(lambda: len(runs.runs) >= 3, "three handler runs", 10)
        await asyncio.sleep(0.5)  # a fourth run would show up here

        # Then the handler ran exactly 3 times, at t, t+1s, t+3s, as attempts 1, 2, 3
        assert [run.attempt for run in runs.runs] == [1, 2, 3]
        start = runs.runs[0].at
        gaps = [run.at - start for run in runs.runs]
        assert gaps[1] == pytest.approx(1.0, abs=0.5), gaps
        assert gaps[2] == pytest.approx(3.0, abs=0.5), gaps
        # and each retry copy came back through one tier only: x-death does not accumulate
        assert [_death_count(run.headers) for run in runs.runs] == [0, 1, 1]

    # and the message is in pay.dlq, with every documented header
    [dead] = await drain(vhost_url, "pay.dlq")
    headers = dead.headers
    assert headers["rabbitflow-attempt"] == 3
    assert text(headers["rabbitflow-origin-queue"]) == "pay"
    assert text(headers["rabbitflow-origin-exchange"]) == "orders"
    assert text(headers["rabbitflow-origin-routing-key"]) == "order.created"
    first_failed = datetime.fromisoformat(text(headers["rabbitflow-first-failed-at"]))
    assert first_failed.utcoffset() == timedelta(0)  # UTC, with its offset written out
    assert first_failed.timestamp() == pytest.approx(wall_first[0], abs=1.0)
    assert text(headers["rabbitflow-error-type"]) == (
        f"{PaymentDeclinedError.__module__}.PaymentDeclinedError"
    )
    message = text(headers["rabbitflow-error-message"])
    assert message.startswith("level 30: declined: é")
    assert len(message.encode()) <= 1024
    stack = text(headers["rabbitflow-error-stack"])
    assert len(stack.encode()) <= 8 * 1024
    # The end of the traceback is kept, frames included, however long the messages are.
    last_frames = stack[stack.rindex("Traceback (most recent call last):") :]
    assert "in _fail_deep" in last_frames
    assert "PaymentDeclinedError: level 30: declined: é" in last_frames
    # The user's headers and properties survive every copy.
    assert text(headers["tenant"]) == "acme"
    assert text(headers["traceparent"]) == "00-abc-def-01"
    assert dead.message_id == "m-1"
    assert dead.correlation_id == "c-1"
    assert dead.content_type == "application/json"
    assert json.loads(dead.body) == {"order_id": 1}
    # The DLQ copy is a fresh publish: no x-death history beyond what the broker adds once.
    assert _death_count(headers) <= 1
    # The retry copy of attempt 2 already said when the message first failed.
    assert text(runs.runs[1].headers["rabbitflow-first-failed-at"]) == text(
        headers["rabbitflow-first-failed-at"]
    )
    assert text(runs.runs[1].headers["rabbitflow-error-message"]) == "card declined"
    # Nothing is left anywhere else.
    left = depths(rabbit, vhost)
    assert left["pay"] == left["pay.retry.1s"] == left["pay.retry.2s"] == 0


@pytest.mark.slow
async def test_a_handler_that_recovers_is_processed_once_and_nothing_is_dead_lettered(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a handler failing twice, then succeeding
    app = app_for(
        tmp_path,
        ORDERS
        + """
[queues.ship]
bindings = [{ exchange = "orders", routing_key = "order.paid" }]
retry = { delays = ["500ms", "1s"], max_attempts = 5 }
""",
    )
    runs = Runs()
    shipped: list[str | None] = []

    @app.consumer("ship")
    async def ship(message: Message) -> None:
        runs.add(message)
        if message.attempt <= 2:
            raise ConnectionError("carrier API down")
        shipped.append(message.message_id)

    # When a message is published
    async with running(app, vhost_url):
        await publish(vhost_url, "orders", "order.paid", b"{}", message_id="m-2")
        await wait_for(lambda: shipped, "the message to be processed", 10)
        await asyncio.sleep(1.2)  # longer than the tiers: a stray copy would come back

    # Then it was processed exactly once, on attempt 3, and nothing is left anywhere
    assert shipped == ["m-2"]
    assert [run.attempt for run in runs.runs] == [1, 2, 3]
    assert depths(rabbit, vhost) == {
        "ship": 0,
        "ship.retry.500ms": 0,
        "ship.retry.1s": 0,
        "ship.dlq": 0,
    }


async def test_a_retry_goes_back_to_the_failing_queue_only(tmp_path: Path, vhost_url: str) -> None:
    # Given two queues bound to the same exchange and routing key
    app = app_for(
        tmp_path,
        ORDERS
        + """
[queues.billing]
bindings = [{ exchange = "orders", routing_key = "order.created" }]
retry = { delays = ["500ms"] }

[queues.audit]
bindings = [{ exchange = "orders", routing_key = "order.created" }]
""",
    )
    billing, audit = Runs(), Runs()

    @app.consumer("billing")
    async def bill(message: Message) -> None:
        billing.add(message)
        if message.attempt == 1:
            raise TimeoutError("payment provider timed out")

    @app.consumer("audit")
    async def record_audit(message: Message) -> None:
        audit.add(message)

    # When only billing fails, then succeeds on its retry
    async with running(app, vhost_url):
        await publish(vhost_url, "orders", "order.created", b"{}", message_id="m-3")
        await wait_for(lambda: len(billing.runs) == 2, "billing's retry", 5)
        await asyncio.sleep(1.0)  # a copy that reached audit would be handled by now

    # Then audit received exactly one copy in total, billing two runs
    assert [run.attempt for run in billing.runs] == [1, 2]
    assert len(audit.runs) == 1
    assert audit.runs[0].attempt == 1


class Order(BaseModel):
    order_id: int


OUTCOMES = """
[exchanges.in]
type = "direct"

[defaults]
retry = { delays = ["500ms"], max_attempts = 3 }

[queues.decode]
bindings = [{ exchange = "in", routing_key = "decode" }]

[queues.reject]
bindings = [{ exchange = "in", routing_key = "reject" }]

[queues.lookup]
bindings = [{ exchange = "in", routing_key = "lookup" }]

[queues.network]
bindings = [{ exchange = "in", routing_key = "network" }]

[queues.configured]
bindings = [{ exchange = "in", routing_key = "configured" }]
retry_on = ["ConnectionError"]
dead_letter_on = ["LookupError"]
"""

# message_id -> what the handler raises on the first attempt (later attempts succeed)
RAISES: dict[str, type[Exception] | None] = {
    "value": ValueError,
    "refused": ConnectionRefusedError,
    "key": KeyError,
}


def _raise_first(message: Message, runs: Runs) -> None:
    runs.add(message)
    error = RAISES.get((message.message_id or "").split("-")[0])
    if error is not None and message.attempt == 1:
        raise error("downstream said no")


@pytest.mark.slow
async def test_each_exception_gets_its_documented_outcome(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given handlers for each outcome rule, in the decorator and in the topology
    app = app_for(tmp_path, OUTCOMES)
    runs = Runs()

    @app.consumer("decode")
    async def decode(order: Order, message: Message) -> None:
        runs.add(message)

    @app.consumer("reject")
    async def reject(message: Message) -> None:
        runs.add(message)
        raise Reject("order belongs to a deleted account")

    @app.consumer("lookup", dead_letter_on=(KeyError,))
    async def lookup(message: Message) -> None:
        _raise_first(message, runs)

    @app.consumer("network", retry_on=(ConnectionError,))
    async def network(message: Message) -> None:
        _raise_first(message, runs)

    @app.consumer("configured")
    async def configured(message: Message) -> None:
        _raise_first(message, runs)

    # When messages that trigger each rule are published
    sent = [
        ("decode", "bad-json", b"{not json"),
        ("decode", "bad-model", b'{"order_id": "not a number"}'),
        ("reject", "rejected", b"{}"),
        ("lookup", "key-1", b"{}"),
        ("network", "value-1", b"{}"),
        ("network", "refused-1", b"{}"),
        ("configured", "value-2", b"{}"),
        ("configured", "key-2", b"{}"),
        ("configured", "refused-2", b"{}"),
    ]
    async with running(app, vhost_url):
        for key, message_id, body in sent:
            await publish(vhost_url, "in", key, body, message_id=message_id)
        retried = ("refused-1", "refused-2")
        await wait_for(lambda: all(runs.count(m) == 2 for m in retried), "the retried messages", 5)
        await asyncio.sleep(0.8)  # longer than the tier: a stray retry would run by now

    # Then undecodable payloads never reach the handler and are dead-lettered at once
    assert runs.count("bad-json") == runs.count("bad-model") == 0
    dead = {
        queue: {m.message_id: m.headers for m in await drain(vhost_url, f"{queue}.dlq")}
        for queue in ("decode", "reject", "lookup", "network", "configured")
    }
    assert set(dead["decode"]) == {"bad-json", "bad-model"}
    for headers in dead["decode"].values():
        assert text(headers["rabbitflow-error-type"]) == "rabbitflow.errors.DecodeError"
        assert headers["rabbitflow-attempt"] == 1
    assert "invalid json" in text(dead["decode"]["bad-json"]["rabbitflow-error-message"]).lower()
    assert "order_id" in text(dead["decode"]["bad-model"]["rabbitflow-error-message"])
    # Reject and dead_letter_on go to the DLQ after one run
    assert text(dead["reject"]["rejected"]["rabbitflow-error-type"]) == "rabbitflow.errors.Reject"
    assert text(dead["lookup"]["key-1"]["rabbitflow-error-type"]) == "KeyError"
    # retry_on: what is not listed is dead-lettered at once; a subclass of a listed type
    # (ConnectionRefusedError < ConnectionError) is retried, then succeeds
    assert set(dead["network"]) == {"value-1"}
    assert text(dead["network"]["value-1"]["rabbitflow-error-type"]) == "ValueError"
    # The same rules written in the topology; KeyError follows LookupError by the MRO
    assert set(dead["configured"]) == {"value-2", "key-2"}
    for message_id in ("rejected", "key-1", "value-1", "value-2", "key-2"):
        assert runs.count(message_id) == 1, message_id
    for message_id in retried:
        assert [run.attempt for run in runs.of(message_id)] == [1, 2]
    for messages in dead.values():
        for message_id, dlq_headers in messages.items():
            assert dlq_headers["rabbitflow-attempt"] == 1, message_id
    retry_depths = {name: n for name, n in depths(rabbit, vhost).items() if ".retry." in name}
    assert set(retry_depths.values()) == {0}


@pytest.mark.slow
async def test_retry_with_a_delay_waits_at_least_that_long(tmp_path: Path, vhost_url: str) -> None:
    # Given tiers of 1s and 5s, and handlers that ask for a 3s and an 8s delay once
    app = app_for(
        tmp_path,
        """
[defaults]
retry = { delays = ["1s", "5s"], max_attempts = 3 }

[queues.rate-limited]

[queues.long-backoff]
""",
    )
    runs = Runs()

    @app.consumer("rate-limited")
    async def limited(message: Message) -> None:
        runs.add(message)
        if message.attempt == 1:
            raise Retry(delay="3s")  # e.g. a 429 with Retry-After: 3

    @app.consumer("long-backoff")
    async def backoff(message: Message) -> None:
        runs.add(message)
        if message.attempt == 1:
            raise Retry(delay="8s")  # beyond the largest tier

    # When one message goes to each
    async with running(app, vhost_url):
        await publish(vhost_url, "", "rate-limited", b"{}", message_id="in-3s")
        await publish(vhost_url, "", "long-backoff", b"{}", message_id="in-8s")
        await wait_for(lambda: runs.count("in-8s") == 2, "the 8s retry", 14)

    # Then 3s waits for the 5s tier (the smallest >= 3s), not the 1s tier
    first, second = runs.of("in-3s")
    assert second.at - first.at == pytest.approx(5.0, abs=0.6)
    # and 8s, beyond the largest tier, is not run before 8s: after one 5s hop it is parked
    # again (rabbitflow-not-before) in tiers that do not overshoot, and runs close to 8s
    first, second = runs.of("in-8s")
    assert 7.9 <= second.at - first.at <= 9.2
    # Each is a single retry: attempt 2, and no run in between
    assert [run.attempt for run in runs.of("in-3s")] == [1, 2]
    assert [run.attempt for run in runs.of("in-8s")] == [1, 2]


CRASH_TOPOLOGY = """
[queues.crashy]
queue_type = "quorum"
crash_limit = 3
prefetch = 1
retry = { delays = ["1s"] }
"""


@pytest.mark.slow
@pytest.mark.crash
async def test_a_message_that_kills_the_worker_ends_in_the_dlq(
    tmp_path: Path, vhost_url: str, workers: Workers
) -> None:
    # Given a quorum queue with crash_limit = 3 holding one poison message among others
    app = app_for(tmp_path, CRASH_TOPOLOGY)
    await declare_topology(app, vhost_url)
    ids = ["ok-1", "ok-2", "poison-1", "ok-3", "ok-4", "ok-5"]
    await publish_many(vhost_url, "crashy", ids)

    async def finished() -> bool:
        if set(workers.records.ids("done")) != set(ids) - {"poison-1"}:
            return False
        return (await ready_counts(vhost_url, ["crashy.dlq"]))["crashy.dlq"] == 1

    # When a worker that dies on the poison message is restarted every time it dies
    starts = await workers.restart_until(
        finished, "tests.crashapp:app", tmp_path / "topology.toml", "--shutdown-timeout", "2",
        starts=10, timeout=60,
    )  # fmt: skip

    # Then every other message was processed exactly once
    records = workers.records
    done = [fields[0] for fields in records.of("done")]
    assert sorted(done) == sorted(set(ids) - {"poison-1"})
    # and the poison message killed the worker crash_limit + 1 times, then the broker
    # dead-lettered it to crashy.dlq with reason delivery_limit
    crashes = records.of("crash")
    assert len(crashes) == 4, records.lines()
    [dead] = await drain(vhost_url, "crashy.dlq")
    assert dead.message_id == "poison-1"
    deaths: list[dict[str, Any]] = dead.headers["x-death"]  # type: ignore[assignment]
    death = deaths[0]
    assert text(death["reason"]) == "delivery_limit"
    assert text(death["queue"]) == "crashy"
    # One more start after the last crash handled everything that was left.
    assert starts == len(crashes) + 1


@pytest.mark.slow
async def test_a_deleted_retry_tier_is_declared_again_and_the_retry_goes_through(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a queue whose retry tier has been deleted behind rabbitflow's back
    app = app_for(
        tmp_path,
        """
[queues.fragile]
retry = { delays = ["1s"], max_attempts = 5 }
""",
    )
    runs = Runs()

    @app.consumer("fragile")
    async def fragile(message: Message) -> None:
        runs.add(message)
        if len(runs.runs) < 3:
            raise ConnectionError("downstream down")

    async with running(app, vhost_url):
        rabbit.admin.delete_queue(vhost, "fragile.retry.1s")
        # When the handler fails twice: the first retry copy is returned as unroutable
        await publish(vhost_url, "", "fragile", b"{}", message_id="m-7")
        await wait_for(lambda: len(runs.runs) >= 3, "three handler runs", 10)
        await asyncio.sleep(0.5)
        # Then the worker declared the tier again and the copies went through it
        left = depths(rabbit, vhost)

    assert [run.message_id for run in runs.runs] == ["m-7"] * 3
    assert [run.attempt for run in runs.runs] == [1, 2, 3]
    # one tier delay apart: the retries waited in the re-declared tier
    assert runs.runs[1].at - runs.runs[0].at >= 0.9
    assert "fragile.retry.1s" in left
    assert left["fragile"] == left["fragile.dlq"] == left["fragile.retry.1s"] == 0


@pytest.mark.slow
async def test_with_no_declare_a_missing_tier_costs_attempts_with_backoff_then_the_dlq(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a classic queue (no redelivery count) whose retry tier is deleted, and a worker
    # that may not declare
    app = app_for(
        tmp_path,
        """
[queues.fragile]
queue_type = "classic"
retry = { delays = ["1s"], max_attempts = 3 }
""",
    )
    runs = Runs()

    @app.consumer("fragile")
    async def fragile(message: Message) -> None:
        runs.add(message)
        raise ConnectionError("downstream down")

    await declare_topology(app, vhost_url)
    async with running(app, vhost_url, declare=False):
        rabbit.admin.delete_queue(vhost, "fragile.retry.1s")
        # When the handler keeps failing
        await publish(vhost_url, "", "fragile", b"{}", message_id="m-8")
        await wait_for(lambda: depths(rabbit, vhost)["fragile.dlq"] == 1, "the DLQ copy", 15)
        await asyncio.sleep(1.5)

    # Then each failed retry counted as an attempt: max_attempts runs, not a loop
    assert [run.attempt for run in runs.runs] == [1, 2, 3]
    # backing off between them (1 s, then 2 s), not a hot loop
    assert runs.runs[1].at - runs.runs[0].at >= 0.9
    assert runs.runs[2].at - runs.runs[1].at >= 1.9
    # and the message ended in the DLQ, nothing left in the queue
    left = depths(rabbit, vhost)
    assert left["fragile"] == 0
    assert "fragile.retry.1s" not in left


async def test_immediate_retries_run_in_process_and_count_as_attempts(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given immediate_retries = 2, a handler that recovers on its third run and one that
    # never recovers
    app = app_for(
        tmp_path,
        """
[defaults]
immediate_retries = 2

[queues.flaky]
retry = { delays = ["30s"], max_attempts = 5 }

[queues.broken]
retry = { delays = ["1s"], max_attempts = 4 }
""",
    )
    runs = Runs()

    @app.consumer("flaky")
    async def flaky(message: Message) -> None:
        runs.add(message)
        if message.attempt < 3:
            raise ConnectionResetError("connection reset by peer")

    @app.consumer("broken")
    async def broken(message: Message) -> None:
        runs.add(message)
        raise ConnectionResetError("connection reset by peer")

    async with running(app, vhost_url):
        await publish(vhost_url, "", "flaky", b"{}", message_id="flaky-1")
        await publish(vhost_url, "", "broken", b"{}", message_id="broken-1")
        await wait_for(lambda: runs.count("broken-1") == 4, "four runs of broken-1", 6)
        await asyncio.sleep(0.3)

    # Then flaky-1 ran 3 times in a row in the same delivery, never through the 30s tier
    flaky_runs = runs.of("flaky-1")
    assert [run.attempt for run in flaky_runs] == [1, 2, 3]
    assert not any(run.redelivered for run in flaky_runs)
    assert flaky_runs[-1].at - flaky_runs[0].at < 1.5
    # and broken-1 spent attempts 1-3 in process, attempt 4 after the 1s tier, then the DLQ
    broken_runs = runs.of("broken-1")
    assert [run.attempt for run in broken_runs] == [1, 2, 3, 4]
    assert broken_runs[2].at - broken_runs[0].at < 1.5
    assert broken_runs[3].at - broken_runs[2].at >= 0.9
    [dead] = await drain(vhost_url, "broken.dlq")
    assert dead.headers["rabbitflow-attempt"] == 4
    left = depths(rabbit, vhost)
    assert left["flaky.retry.30s"] == left["flaky"] == left["flaky.dlq"] == 0


@pytest.mark.slow
async def test_the_circuit_breaker_keeps_the_backlog_in_the_queue_while_downstream_is_down(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a breaker on a queue with prefetch 4, and a downstream that is down
    app = app_for(
        tmp_path,
        """
[queues.downstream]
prefetch = 4
retry = { delays = ["1s"], max_attempts = 20 }
circuit_breaker = { failure_ratio = 0.5, window = "10s", min_calls = 4, cooldown = "2s" }
""",
    )
    down = True
    calls: list[str] = []
    processed: list[str] = []

    @app.consumer("downstream")
    async def call_downstream(message: Message) -> None:
        calls.append(message.message_id or "")
        if down:
            raise ConnectionRefusedError("downstream refused the connection")
        processed.append(message.message_id or "")

    ids = [f"m-{n}" for n in range(30)]
    async with running(app, vhost_url) as worker:
        # When 30 messages arrive while the downstream fails
        await publish_many(vhost_url, "downstream", ids)
        await wait_for(lambda: "downstream" in worker.paused, "the breaker to open", 5)

        # Then consuming pauses: the backlog waits in the queue, not in the retry tier
        await asyncio.sleep(2.5)  # through one half-open trial that fails again
        counts = await ready_counts(vhost_url, ["downstream", "downstream.retry.1s"])
        # About one prefetch window per trial runs (without the breaker: all 30 at once);
        # the rest waits in the queue, and the tier holds at most about a prefetch.
        assert len(calls) <= 3 * 4, calls
        assert counts["downstream"] >= 30 - 3 * 4, counts
        assert counts["downstream.retry.1s"] <= 4, counts

        # When the downstream recovers, after the cool-down consuming resumes
        down = False
        await wait_for(lambda: len(processed) >= 30, "every message processed", 15)
        await asyncio.sleep(0.5)
        assert not worker.paused
        # Pausing and resuming never cost the connection (redeliveries, duplicates)
        assert worker.reconnections == 0

    # Then every message was processed exactly once, and none was dead-lettered
    assert sorted(processed) == sorted(ids)
    left = depths(rabbit, vhost)
    assert left["downstream"] == left["downstream.retry.1s"] == 0
    assert left["downstream.dlq"] == 0


async def test_the_circuit_breaker_counts_failures_that_are_dead_lettered_too(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a breaker on a queue without delayed retries: each failure goes to the DLQ
    app = app_for(
        tmp_path,
        """
[queues.no-retry]
prefetch = 1
retry = false
circuit_breaker = { failure_ratio = 0.5, window = "10s", min_calls = 3, cooldown = "30s" }
""",
    )
    calls: list[str] = []

    @app.consumer("no-retry")
    async def call_downstream(message: Message) -> None:
        calls.append(message.message_id or "")
        raise ConnectionRefusedError("downstream refused the connection")

    # When 20 messages arrive while the downstream is down
    async with running(app, vhost_url) as worker:
        await publish_many(vhost_url, "no-retry", [f"m-{n}" for n in range(20)])
        await wait_for(lambda: "no-retry" in worker.paused, "the breaker to open", 5)
        await asyncio.sleep(0.5)
        counts = await ready_counts(vhost_url, ["no-retry", "no-retry.dlq"])

    # Then the breaker opened after min_calls failures instead of draining the backlog
    # into the DLQ
    assert len(calls) <= 4, calls
    assert counts["no-retry"] >= 15, counts
    assert counts["no-retry.dlq"] <= 4, counts


async def test_retries_list_shows_what_waits_in_each_tier_and_the_gauges_count_it(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a queue with a 1 h tier and a handler that fails twice, then rejects one more
    app = app_for(
        tmp_path,
        """
[queues.slow]
retry = { delays = ["1h"], max_attempts = 3 }
""",
    )

    @app.consumer("slow")
    async def slow(message: Message) -> None:
        if message.message_id == "bad":
            raise Reject("no")
        raise ConnectionError("later")

    async with running(app, vhost_url) as worker:
        for key in ("a", "b", "bad"):
            await publish(vhost_url, "", "slow", b"{}", message_id=key)
        await wait_for(
            lambda: depths(rabbit, vhost)["slow.retry.1h"] == 2, "two messages in the tier", 10
        )
        # When the tier monitor samples
        # (from the management API, whose figures lag by up to 5 s)
        connection = await aiormq.connect(vhost_url)

        async def sampled() -> str | None:
            await worker.tier_monitor.sample(await connection.channel())
            metrics = worker.metrics.render()
            dlq = 'rabbitflow_dlq_messages{queue="slow"} 1'
            return metrics if 'tier="1h"} 2' in metrics and dlq in metrics else None

        try:
            metrics = await eventually(sampled, "the gauges of the tier and the DLQ", 20, 0.5)
        finally:
            await connection.close()

    # Then the gauges count the tier and the DLQ
    assert 'rabbitflow_retry_tier_messages{queue="slow",tier="1h"} 2' in metrics
    assert 'rabbitflow_dlq_messages{queue="slow"} 1' in metrics

    # and `retries list` shows both messages, due in about an hour, and leaves them there
    result = await asyncio.to_thread(
        run_cli, "retries", "list", "slow", "--url", vhost_url, "--topology",
        str(tmp_path / "topology.toml"), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [tier] = json.loads(result.stdout)["tiers"]
    assert (tier["tier"], tier["count"], tier["overdue"]) == ("slow.retry.1h", 2, False)
    assert sorted(m["message_id"] for m in tier["messages"]) == ["a", "b"]
    for waiting in tier["messages"]:
        assert waiting["attempt"] == 2
        assert waiting["error_type"] == "ConnectionError"
        due = datetime.fromisoformat(waiting["due_at"])
        assert timedelta(minutes=58) < due - datetime.now(due.tzinfo) < timedelta(minutes=61)
    assert depths(rabbit, vhost)["slow.retry.1h"] == 2
