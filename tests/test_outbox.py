"""The transactional outbox against the real PostgreSQL and RabbitMQ (contract section 11):
a committed row is published once, a rolled-back one never; several relays share a table
without publishing a row twice; rows of one key arrive in commit order; a row the broker
refuses is retried, then parked, while the others flow.

Each test has its own vhost and its own PostgreSQL schema, dropped afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest
from pydantic import BaseModel

from rabbitflow import App, Message
from rabbitflow.outbox import PostgresOutbox
from tests.support.outbox import EXCHANGE, Sink, count_rows, outbox_in_own_schema, write_rows
from tests.support.processes import ROOT, run_cli
from tests.support.services import POSTGRES_URL
from tests.support.topology import app_for
from tests.support.waiting import eventually, wait_for
from tests.support.worker import running

pytestmark = pytest.mark.broker


class OrderCreated(BaseModel):
    order_id: int
    amount: float


async def test_a_committed_row_is_published_once_and_a_rolled_back_one_never(
    vhost_url: str,
) -> None:
    async with outbox_in_own_schema() as outbox, Sink(vhost_url) as sink:
        app = App(url=vhost_url, outbox=outbox)
        # Given one transaction that commits and one that rolls back
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
            async with conn.transaction():
                await app.outbox.publish(
                    conn,
                    EXCHANGE,
                    "order.created",
                    OrderCreated(order_id=1, amount=9.5),
                    message_id="order-1",
                    key="order-1",
                )
            try:
                async with conn.transaction():
                    await app.outbox.publish(
                        conn, EXCHANGE, "order.created", {"order_id": 2}, message_id="order-2"
                    )
                    raise LookupError("the order failed")
            except LookupError:
                pass
        # When a relay runs
        async with outbox.relaying(app) as relay:
            await sink.wait_for_ids(["order-1"])
            await asyncio.sleep(1.5)  # a poll interval: anything else would have come
        await app.close()
        # Then the committed message arrived once, the rolled-back one never
        assert sink.ids == ["order-1"]
        assert json.loads(sink.received[0].body) == {"order_id": 1, "amount": 9.5}
        assert relay.published == 1
        assert await count_rows(outbox, "sent") == 1


async def test_the_relay_sends_exactly_what_app_publish_sends(vhost_url: str) -> None:
    async with outbox_in_own_schema() as outbox, Sink(vhost_url) as sink:
        app = App(url=vhost_url, outbox=outbox)
        fields = {
            "headers": {"tenant": "acme", "count": 3, "ratio": 0.5, "flag": True},
            "correlation_id": "corr-1",
            "priority": 4,
            "expiration": 600_000,
        }
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn, conn.transaction():
            await app.outbox.publish(
                conn,
                EXCHANGE,
                "order.created",
                OrderCreated(order_id=7, amount=1.25),
                message_id="via-outbox",
                **fields,
            )
        await app.publish(
            EXCHANGE,
            "order.created",
            OrderCreated(order_id=7, amount=1.25),
            message_id="via-publish",
            **fields,
        )
        async with outbox.relaying(app):
            await sink.wait_for_ids(["via-outbox", "via-publish"])
        await app.close()
        by_id = {m.message_id: m for m in sink.received}
        outboxed, published = by_id["via-outbox"], by_id["via-publish"]
        assert outboxed.body == published.body
        for name in ("content_type", "delivery_mode", "correlation_id", "priority", "expiration"):
            assert getattr(outboxed, name) == getattr(published, name), name
        assert outboxed.headers == published.headers


async def test_sqlalchemy_async_session_writes_in_its_transaction(vhost_url: str) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy.ext.asyncio")
    async with outbox_in_own_schema() as outbox, Sink(vhost_url) as sink:
        app = App(url=vhost_url, outbox=outbox)
        engine = sqlalchemy.create_async_engine(
            POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://")
        )
        try:
            async with sqlalchemy.AsyncSession(engine) as session:
                async with session.begin():
                    await app.outbox.publish(
                        session, EXCHANGE, "order.created", {"n": 1}, message_id="sa-1", key="k"
                    )
                try:
                    async with session.begin():
                        await app.outbox.publish(
                            session, EXCHANGE, "order.created", {"n": 2}, message_id="sa-2"
                        )
                        raise LookupError("rolled back")
                except LookupError:
                    pass
        finally:
            await engine.dispose()
        async with outbox.relaying(app):
            await sink.wait_for_ids(["sa-1"])
            await asyncio.sleep(1.5)
        await app.close()
        assert sink.ids == ["sa-1"]


async def test_a_connection_of_another_kind_is_refused_with_a_clear_error() -> None:
    from rabbitflow.errors import ConfigurationError

    async with outbox_in_own_schema() as outbox:
        with (
            psycopg.connect(POSTGRES_URL) as sync_conn,
            pytest.raises(ConfigurationError, match="AsyncConnection"),
        ):
            await outbox.publish(sync_conn, EXCHANGE, "x", {})


@pytest.mark.slow
async def test_three_relays_publish_ten_thousand_rows_each_once(vhost_url: str) -> None:
    async with outbox_in_own_schema(batch_size=200) as outbox, Sink(vhost_url) as sink:
        ids = await write_rows(outbox, 10_000, per_transaction=1000)
        apps = [App(url=vhost_url, outbox=outbox) for _ in range(3)]
        async with (
            outbox.relaying(apps[0]) as one,
            outbox.relaying(apps[1]) as two,
            outbox.relaying(apps[2]) as three,
        ):
            await sink.wait_for_ids(ids, timeout=60)
            await asyncio.sleep(0.5)
        for app in apps:
            await app.close()
        # Every row published, none twice, and the work was shared
        assert sorted(sink.ids) == sorted(ids)
        assert sink.duplicates() == 0
        shares = [one.published, two.published, three.published]
        assert sum(shares) == 10_000
        assert sum(1 for share in shares if share > 0) >= 2, shares
        assert await count_rows(outbox, "pending") == 0


@pytest.mark.slow
async def test_rows_of_one_key_arrive_in_commit_order_under_three_relays(vhost_url: str) -> None:
    async with outbox_in_own_schema(batch_size=50) as outbox, Sink(vhost_url) as sink:
        # Given 20 keys, their rows committed by 4 writers at once, interleaved
        async def writer(w: int) -> None:
            async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
                for round_ in range(25):
                    async with conn.transaction():
                        for k in range(w, 20, 4):
                            await outbox.publish(
                                conn,
                                EXCHANGE,
                                f"order.{k}",
                                {"key": k, "seq": round_},
                                message_id=f"k{k}-{round_}",
                                key=f"order-{k}",
                            )

        apps = [App(url=vhost_url, outbox=outbox) for _ in range(3)]
        async with (
            outbox.relaying(apps[0]),
            outbox.relaying(apps[1]),
            outbox.relaying(apps[2]),
        ):
            await asyncio.gather(*(writer(w) for w in range(4)))
            await sink.wait_for_ids({f"k{k}-{r}" for k in range(20) for r in range(25)}, 60)
        for app in apps:
            await app.close()
        seen: dict[int, list[int]] = defaultdict(list)
        for body in sink.bodies():
            seen[body["key"]].append(body["seq"])
        assert seen == {k: list(range(25)) for k in range(20)}


async def test_a_row_the_broker_refuses_is_retried_then_parked_and_the_rest_flow(
    vhost_url: str,
) -> None:
    async with (
        outbox_in_own_schema(max_attempts=2, retry_backoff=0.2, poll_interval=0.2) as outbox,
        Sink(vhost_url) as sink,
    ):
        app = App(url=vhost_url, outbox=outbox)
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn, conn.transaction():
            await outbox.publish(conn, "no-such-exchange", "x", {"lost": True}, message_id="bad")
            await outbox.publish(conn, "", "no-such-queue", {}, message_id="unroutable", key="u")
        good = await write_rows(outbox, 300, per_transaction=100)
        async with outbox.relaying(app) as relay:
            await sink.wait_for_ids(good)

            async def parked() -> int:
                return await count_rows(outbox, "parked")

            for _ in range(100):
                if await parked() == 2:
                    break
                await asyncio.sleep(0.1)
        await app.close()
        assert sorted(sink.ids) == sorted(good)
        assert relay.parked == 2
        # The operator sees both with their errors, retries one and purges the other
        common = ["--dsn", POSTGRES_URL, "--schema", outbox.schema or ""]
        listed = run_cli("outbox", "list", *common)
        assert listed.returncode == 0, listed.stderr
        assert "2 parked" in listed.stdout
        assert "no exchange 'no-such-exchange'" in listed.stdout
        assert "unroutable" in listed.stdout
        rows = run_cli("outbox", "list", *common, "--json")
        by_id = {r["message_id"]: r for r in map(json.loads, rows.stdout.splitlines())}
        assert by_id["bad"]["attempts"] == 2
        retried = run_cli("outbox", "retry", *common, str(by_id["unroutable"]["id"]))
        assert "1 parked row(s) pending again" in retried.stdout
        purged = run_cli("outbox", "purge", *common, "--yes")
        assert "1 parked row(s) deleted" in purged.stdout
        assert await count_rows(outbox, "pending") == 1
        assert await count_rows(outbox, "parked") == 0


async def test_install_is_idempotent_and_prints_its_sql(vhost_url: str) -> None:
    async with outbox_in_own_schema() as outbox:
        again = run_cli("outbox", "install", "--dsn", POSTGRES_URL, "--schema", outbox.schema or "")
        assert again.returncode == 0, again.stderr
        assert await count_rows(outbox, "pending") == 0
    printed = run_cli("outbox", "install", "--sql", "--table", "jobs_outbox")
    assert printed.returncode == 0
    assert "CREATE TABLE IF NOT EXISTS jobs_outbox" in printed.stdout
    bad = run_cli("outbox", "install", "--sql", "--table", "Bad-Name")
    assert bad.returncode == 2
    assert "plain lower-case SQL identifier" in bad.stderr


async def test_sent_rows_are_deleted_after_their_retention(vhost_url: str) -> None:
    from rabbitflow.outbox._claims import Claims

    async with outbox_in_own_schema(retention=0.5) as outbox, Sink(vhost_url) as sink:
        app = App(url=vhost_url, outbox=outbox)
        ids = await write_rows(outbox, 10)
        async with outbox.relaying(app):
            await sink.wait_for_ids(ids)
        await app.close()
        assert await count_rows(outbox, "sent") == 10
        await asyncio.sleep(0.6)
        async with await outbox.connect() as conn:
            assert await Claims(conn, outbox.statements).sweep(outbox.retention, 100) == 10
        assert await count_rows(outbox, "sent") == 0


def test_bad_settings_are_refused_when_the_outbox_is_made() -> None:
    from rabbitflow.errors import ConfigurationError

    with pytest.raises(ValueError, match="identifier"):
        PostgresOutbox(POSTGRES_URL, table="orders; DROP TABLE x")
    with pytest.raises(ConfigurationError, match="lease"):
        PostgresOutbox(POSTGRES_URL, lease="soon")
    with pytest.raises(ConfigurationError, match="shorter than the lease"):
        PostgresOutbox(POSTGRES_URL, lease="10s", publish_timeout="10s")


def _relay_env(outbox: PostgresOutbox, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RF_OUTBOX_DSN": POSTGRES_URL,
        "RF_OUTBOX_SCHEMA": outbox.schema or "",
        **extra,
    }


async def test_rabbitflow_run_relays_unless_told_not_to(vhost_url: str, tmp_path: Path) -> None:
    async with outbox_in_own_schema() as outbox, Sink(vhost_url) as sink:
        ids = await write_rows(outbox, 50)
        command = [sys.executable, "-m", "rabbitflow", "run", "tests.apps.outbox_app:app"]
        command += ["--url", vhost_url, "--log-format", "json"]
        # Told not to, the worker leaves the rows alone
        quiet = subprocess.Popen(  # noqa: ASYNC220 - a worker, not awaited
            [*command, "--no-outbox-relay"],
            cwd=ROOT,
            env=_relay_env(outbox),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(4)
            assert sink.ids == []
        finally:
            quiet.terminate()
            quiet.wait(15)
        # By default it relays them
        log = tmp_path / "run.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(  # noqa: ASYNC220 - a worker, not awaited
                command, cwd=ROOT, env=_relay_env(outbox), stdout=out, stderr=subprocess.STDOUT
            )
        try:
            await sink.wait_for_ids(ids)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(20) == 0
        assert sink.duplicates() == 0
        assert '"outbox relay started"' in log.read_text()


async def test_a_job_enqueued_through_the_outbox_exists_once_committed(vhost_url: str) -> None:
    from rabbitflow.idempotency import MemoryStore
    from rabbitflow.job import JobState

    async with outbox_in_own_schema() as outbox, Sink(vhost_url) as sink:
        app = App(url=vhost_url, outbox=outbox, jobs=MemoryStore())
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
            async with conn.transaction():
                job = await app.outbox.enqueue(
                    conn, EXCHANGE, "report.sales", {"month": "2026-10"}, job_id="report-1"
                )
            try:
                async with conn.transaction():
                    await app.outbox.enqueue(conn, EXCHANGE, "report.sales", {}, job_id="report-2")
                    raise LookupError("rolled back")
            except LookupError:
                pass
        assert job.id == "report-1"
        async with outbox.relaying(app):
            await sink.wait_for_ids(["report-1"])
            # The relay records the job after the broker confirmed its message.
            status = await eventually(lambda: app.jobs.get("report-1"), "report-1's status", 10)
            await asyncio.sleep(1.2)
        await app.close()
        assert sink.ids == ["report-1"]
        assert status is not None
        assert status.state is JobState.QUEUED
        assert await app.jobs.get("report-2") is None


async def test_enqueue_without_a_job_store_is_refused_before_anything_is_written() -> None:
    from rabbitflow.errors import ConfigurationError

    async with outbox_in_own_schema() as outbox:
        app = App(outbox=outbox)
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
            with pytest.raises(ConfigurationError, match="jobs"):
                await app.outbox.enqueue(conn, EXCHANGE, "x", {})
        assert await count_rows(outbox, "pending") == 0


async def test_the_trace_runs_from_the_writer_through_the_relayed_message(vhost_url: str) -> None:
    from tests.support.spans import capture_spans

    async with outbox_in_own_schema() as outbox, Sink(vhost_url) as sink:
        app = App(url=vhost_url, outbox=outbox)
        with capture_spans() as spans:
            tracer = spans.provider.get_tracer("web")
            # Given a row written inside a request's span
            with tracer.start_as_current_span("POST /orders") as request:
                async with (
                    await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn,
                    conn.transaction(),
                ):
                    await app.outbox.publish(conn, EXCHANGE, "order.created", {}, message_id="t-1")
            # When the relay publishes it later, outside any span
            async with outbox.relaying(app):
                await sink.wait_for_ids(["t-1"])
        await app.close()
        # Then the message carries the PRODUCER span opened in the request
        [producer] = spans.named(f"publish {EXCHANGE}")
        assert producer.parent is not None
        assert producer.parent.span_id == request.get_span_context().span_id
        traceparent = str(sink.received[0].headers["traceparent"])
        assert f"{producer.context.trace_id:032x}" in traceparent
        assert f"{producer.context.span_id:016x}" in traceparent


async def test_metrics_and_a_warning_when_the_lag_passes_its_threshold(vhost_url: str) -> None:
    from structlog.testing import capture_logs

    from rabbitflow._metrics import Metrics

    async with outbox_in_own_schema(lag_warning=0.2) as outbox, Sink(vhost_url) as sink:
        # Given rows older than the threshold, and a relay that cannot reach the broker
        ids = await write_rows(outbox, 20)
        await asyncio.sleep(0.3)
        metrics = Metrics()
        table = outbox.table
        unreachable = App(url="amqp://guest:guest@127.0.0.1:5719/", outbox=outbox)
        with capture_logs() as logs:
            async with outbox.relaying(unreachable, metrics):
                for _ in range(100):
                    if metrics.outbox_pending.labels(table).value == 20:
                        break
                    await asyncio.sleep(0.05)
        # Then the gauges show the backlog and its age, and one WARNING says so
        assert metrics.outbox_pending.labels(table).value == 20
        assert metrics.outbox_oldest_age.labels(table).value >= 0.2
        lag = [
            e
            for e in logs
            if e["event"] == "outbox lag over the threshold: the oldest pending row waits"
        ]
        assert len(lag) == 1
        assert lag[0]["log_level"] == "warning"
        assert lag[0]["pending"] == 20
        # And once a relay reaches the broker the rows are published and counted
        app = App(url=vhost_url, outbox=outbox)
        async with outbox.relaying(app, metrics):
            await sink.wait_for_ids(ids)
            await asyncio.sleep(0.2)
        await app.close()
        assert metrics.outbox_published.labels(table).value == 20
        assert "rabbitflow_outbox_published_total" in metrics.render()


async def test_a_failing_row_holds_back_only_the_later_rows_of_its_key(vhost_url: str) -> None:
    async with (
        outbox_in_own_schema(max_attempts=2, retry_backoff=0.2, poll_interval=0.2) as outbox,
        Sink(vhost_url) as sink,
    ):
        # Given key "a" whose first row goes to a missing exchange, then rows of "a", "b", none
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn, conn.transaction():
            await outbox.publish(conn, "no-such-exchange", "x", {}, message_id="a-0", key="a")
            for n in range(1, 4):
                await outbox.publish(conn, EXCHANGE, "r", {}, message_id=f"a-{n}", key="a")
                await outbox.publish(conn, EXCHANGE, "r", {}, message_id=f"b-{n}", key="b")
                await outbox.publish(conn, EXCHANGE, "r", {}, message_id=f"none-{n}")
        app = App(url=vhost_url, outbox=outbox)
        async with outbox.relaying(app) as relay:
            # Then "b" and the unkeyed rows flow, "a" waits behind its parked row
            others = [f"{k}-{n}" for k in ("b", "none") for n in range(1, 4)]
            await sink.wait_for_ids(others)
            await wait_for(lambda: relay.parked >= 1, "the row to the missing exchange parked")
            await asyncio.sleep(0.6)
            assert not [i for i in sink.ids if i.startswith("a-")]
            # And once the operator purges the parked row, the rest of "a" follows, in order
            purged = run_cli(
                "outbox", "purge", "--dsn", POSTGRES_URL, "--schema", outbox.schema or "", "--yes"
            )
            assert "1 parked row(s) deleted" in purged.stdout
            await sink.wait_for_ids(["a-1", "a-2", "a-3"])
        await app.close()
        assert [i for i in sink.ids if i.startswith("a-")] == ["a-1", "a-2", "a-3"]
        assert sink.duplicates() == 0


DELAYED_TOPOLOGY = """
[queues.later]
prefetch = 50
retry = { delays = ["1s", "10s"], max_attempts = 3 }
"""


async def test_a_delayed_row_runs_no_earlier_than_its_delay_after_the_write(
    vhost_url: str, tmp_path: Path
) -> None:
    # Given a queue with tiers of 1s and 10s and a handler noting when each message runs
    consumer = app_for(tmp_path, DELAYED_TOPOLOGY)
    ran: dict[str, float] = {}

    @consumer.consumer("later")
    async def later(message: Message) -> None:
        ran.setdefault(message.message_id or "", time.time())

    async with outbox_in_own_schema() as outbox, running(consumer, vhost_url):
        writer = App(url=vhost_url, outbox=outbox)
        # When 20 rows are written with a 2 s delay, and a relay publishes them at once
        written: dict[str, float] = {}
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
            for i in range(20):
                async with conn.transaction():
                    written[f"d{i}"] = time.time()
                    await writer.outbox.publish(
                        conn, "", "later", {"i": i}, message_id=f"d{i}", delay="2s"
                    )
        async with outbox.relaying(writer):
            await wait_for(lambda: len(ran) == 20, "the 20 delayed rows to run", 15)
        await writer.close()

    # Then none ran before 2.000 s after its write, and none a whole tier late
    waits = [ran[key] - written[key] for key in written]
    assert min(waits) >= 2.0, min(waits)
    assert max(waits) < 3.0, max(waits)
