"""What counts toward a quorum queue's delivery limit (``crash_limit``), on the real broker.

RabbitMQ counts returns differently per version (measured in docs/recoverability.md): before
4.3 every return counts, from 4.3 a ``basic.nack`` does not. These tests hold rabbitflow to
the table there: crashes count on every version; its own returns (a shutdown cutting a
handler short, a refused copy, reading a tier) cost the message nothing where the broker
allows it. Run them on each broker with ``RABBITFLOW_TEST_URL`` (see ``.ci/run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from rabbitflow import Message
from rabbitflow._retries import waiting
from rabbitflow.console._inventory import read_overview
from rabbitflow.topology import derive
from tests.support.amqp import declare_topology, publish_many, wait_ready
from tests.support.amqp import drain_async as drain
from tests.support.amqp import message_counts_async as ready_counts
from tests.support.broker import Rabbit, broker_version, queue_messages
from tests.support.output import text
from tests.support.processes import Workers
from tests.support.records import Runs
from tests.support.topology import app_for
from tests.support.waiting import eventually, wait_for
from tests.support.worker import running

pytestmark = [pytest.mark.broker]

CRASH_LIMIT = 4


def count(value: str) -> int | None:
    """A recorded header: ``-`` when the delivery did not carry it."""
    return None if value == "-" else int(value)


@pytest.mark.slow
@pytest.mark.crash
async def test_a_handler_that_kills_its_process_reaches_the_dlq_after_crash_limit_runs(
    tmp_path: Path, vhost_url: str, workers: Workers
) -> None:
    # Given a quorum queue with crash_limit = 4 and a message whose handler calls os._exit
    app = app_for(
        tmp_path,
        f"""
[queues.crashy]
queue_type = "quorum"
crash_limit = {CRASH_LIMIT}
prefetch = 1
retry = {{ delays = ["1s"] }}
""",
    )
    await declare_topology(app, vhost_url)
    await publish_many(vhost_url, "crashy", ["poison-1"])
    version = await broker_version(vhost_url)

    async def dead_lettered() -> bool:
        return (await ready_counts(vhost_url, ["crashy.dlq"]))["crashy.dlq"] == 1

    # When `rabbitflow run` is started again every time it dies (a supervisor's loop)
    started = time.monotonic()
    starts = await workers.restart_until(
        dead_lettered, "tests.apps.crashloop:app", tmp_path / "topology.toml",
        "--shutdown-timeout", "2", starts=2 * CRASH_LIMIT + 2, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started

    # Then the handler ran crash_limit + 1 times: the broker dead-lettered the message when
    # the last crash pushed its count past the limit, on every version
    crashes = workers.records.of("crash")
    print(f"RabbitMQ {version}: {len(crashes)} runs, {starts} starts, {elapsed:.1f} s")
    assert len(crashes) == CRASH_LIMIT + 1, crashes
    [dead] = await drain(vhost_url, "crashy.dlq")
    assert dead.message_id == "poison-1"
    deaths: list[dict[str, Any]] = dead.headers["x-death"]  # type: ignore[assignment]
    assert (text(deaths[0]["reason"]), text(deaths[0]["queue"])) == ("delivery_limit", "crashy")
    # each crash counted in x-delivery-count (0 on a first delivery before 3.12), the attempt
    # the handler saw with it, and on 4.3 in x-acquired-count too
    # (a consumer's first delivery has no x-delivery-count, 3.10 included: only basic.get's)
    assert [count(fields[2]) for fields in crashes] == [None, 1, 2, 3, 4]
    assert [int(fields[1]) for fields in crashes] == [1, 2, 3, 4, 5]
    acquired = [None, 1, 2, 3, 4] if version.counts_acquisitions else [None] * 5
    assert [count(fields[3]) for fields in crashes] == acquired


@pytest.mark.slow
async def test_a_shutdown_that_cuts_a_handler_short_spends_the_crash_limit_only_before_4_3(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a quorum queue with crash_limit = 1 and a handler slower than the shutdown timeout
    app = app_for(
        tmp_path,
        """
[queues.slow]
queue_type = "quorum"
crash_limit = 1
""",
    )
    runs = Runs()

    @app.consumer("slow")
    async def slow(message: Message) -> None:
        runs.add(message)
        await asyncio.sleep(60)

    version = await broker_version(vhost_url)
    await declare_topology(app, vhost_url)
    await publish_many(vhost_url, "slow", ["m-1"])

    # When the worker is stopped mid-handler three times (a deploy, a scale-down, ...)
    for stop in range(3):
        async with running(app, vhost_url, shutdown_timeout=0.5):
            await wait_for(lambda n=stop: len(runs.runs) > n, "the handler to start", 10)
        # the broker takes the message back, or dead-letters it, a moment after the close
        where = await _returned(vhost_url, "slow")
        if where == "slow.dlq":
            break

    counts = [run.headers.get("x-delivery-count") for run in runs.runs]
    left = await ready_counts(vhost_url, ["slow", "slow.dlq"])
    if version.nack_counts:
        # Then before 4.3 every return counts, so each shutdown spent one (documented): the
        # second return passed crash_limit 1 and the broker dead-lettered the message
        # (a consumer's first delivery has no x-delivery-count, 3.10 included)
        assert counts == [None, 1]
        assert left == {"slow": 0, "slow.dlq": 1}
    else:
        # Then on 4.3 the drain gave it back with a nack: three runs, none counted, still
        # in its queue, each shutdown seen in x-acquired-count only
        assert counts == [None, None, None]
        assert [run.headers.get("x-acquired-count") for run in runs.runs] == [None, 1, 2]
        assert [run.attempt for run in runs.runs] == [1, 1, 1]
        assert left == {"slow": 1, "slow.dlq": 0}


@pytest.mark.slow
async def test_a_refused_dead_letter_copy_does_not_hand_the_message_to_the_broker(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a quorum queue with crash_limit = 3 whose DLQ is full and refuses publishes
    # (max-length 10, reject-publish: a quorum queue takes the publish that crosses the limit)
    app = app_for(
        tmp_path,
        """
[queues.fragile]
queue_type = "quorum"
crash_limit = 3
retry = false
""",
    )
    runs = Runs()

    @app.consumer("fragile")
    async def fragile(message: Message) -> None:
        runs.add(message)
        raise ValueError("bad order")

    await declare_topology(app, vhost_url)
    full = '{"max-length": 10, "overflow": "reject-publish"}'
    rabbit.ctl("set_policy", "-p", vhost, "full", r"^fragile\.dlq$", full,
               "--apply-to", "queues")  # fmt: skip
    await _fill(vhost_url, "fragile.dlq", 11)
    ids = [f"m-{i}" for i in range(5)]

    async with running(app, vhost_url):
        # When five messages fail while the DLQ refuses their copies for 20 s (rabbitflow
        # used to nack each after 1, 2, 4, 8 s: the fourth return, at 15 s, passed the limit
        # and handed it to the broker's own dead-lettering)
        await publish_many(vhost_url, "fragile", ids)
        await asyncio.sleep(20)
        # and the operator then lifts the limit (the fillers stay), as in issue 22
        rabbit.ctl("clear_policy", "-p", vhost, "full")
        await wait_for(
            lambda: queue_messages(rabbit, vhost).get("fragile.dlq") == 16,
            "the five copies in the DLQ",
            70,
        )

    # Then every message reached the DLQ as rabbitflow's copy (error headers, no broker
    # x-death) soon after, the handler ran once for each, and nothing stayed in the work
    # queue (on 3.10 through a fresh channel: the old one stays refused, see Publisher.renew)
    letters = {m.message_id: m for m in await drain(vhost_url, "fragile.dlq")}
    assert sorted(letters) == sorted([*ids, *(f"filler-{i}" for i in range(11))])
    letters = {key: letters[key] for key in ids}
    for message in letters.values():
        assert text(message.headers["rabbitflow-error-type"]) == "ValueError"
        assert "rabbitflow-error-stack" in message.headers
        assert "x-death" not in message.headers
    assert sorted(run.message_id or "" for run in runs.runs) == ids
    assert (await ready_counts(vhost_url, ["fragile"]))["fragile"] == 0


async def _fill(url: str, queue: str, count: int) -> None:
    """Publish ``count`` messages to ``queue``, taking no for an answer once it is full."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for i in range(count):
            with contextlib.suppress(aio_pika.exceptions.DeliveryError):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"{}", message_id=f"filler-{i}"), routing_key=queue
                )
    finally:
        await connection.close()


@pytest.mark.slow
async def test_reading_a_retry_tier_costs_the_message_nothing_where_the_broker_allows(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a quorum queue with a 3 s tier and a handler that fails its first run
    app = app_for(
        tmp_path,
        """
[queues.later]
queue_type = "quorum"
crash_limit = 2
retry = { delays = ["3s"], max_attempts = 5 }
""",
    )
    runs = Runs()

    @app.consumer("later")
    async def later(message: Message) -> None:
        runs.add(message)
        if len(runs.runs) == 1:
            raise ConnectionError("downstream down")

    version = await broker_version(vhost_url)
    await declare_topology(app, vhost_url)
    routes = derive(app.load_topology()).routes["later"]
    async with running(app, vhost_url):
        await publish_many(vhost_url, "later", ["m-1"])
        await wait_for(lambda: len(runs.runs) == 1, "the first run", 10)
        # When `rabbitflow retries list` reads the tier twice while the copy waits there
        connection = await aio_pika.connect(vhost_url)
        try:
            for _ in range(2):
                await wait_ready(vhost_url, "later.retry.3s", 1)
                [tier] = await waiting(connection, routes)
                assert [m.message_id for m in tier.messages] == ["m-1"]
        finally:
            await connection.close()
        await wait_for(lambda: len(runs.runs) == 2, "the retry", 15)

    second = runs.runs[1]
    if version.nack_counts and version.at_least(4, 0):
        # Then on 4.0 every return counts and at-least-once dead-lettering carries the count
        # to the work queue: the two reads show as x-delivery-count 2 on the retry
        # (documented; the work queue's own limit does not count them on 4.0)
        assert second.headers.get("x-delivery-count") == 2
        assert second.attempt == 4  # rabbitflow-attempt 2 plus the carried count
    else:
        # Then on 3.10 the count stays in the tier, and on 4.3 the reads gave the copy back
        # with a nack, which counts nothing: the retry is attempt 2, its crash limit whole
        assert second.headers.get("x-delivery-count") in (None, 0)
        assert second.attempt == 2


async def _returned(url: str, queue: str) -> str:
    """Where the one message of ``queue`` is once given back: ``queue`` or its DLQ."""
    dlq = f"{queue}.dlq"

    async def where() -> str | None:
        counts = await ready_counts(url, [queue, dlq])
        return queue if counts[queue] else dlq if counts[dlq] else None

    return await eventually(where, f"the message back in {queue} or {dlq}", 5)


async def test_the_console_reads_a_tier_without_counting_where_the_broker_allows(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a quorum queue's 1 m tier holding one copy
    app = app_for(
        tmp_path,
        """
[queues.later]
queue_type = "quorum"
retry = { delays = ["1m"] }
""",
    )
    await declare_topology(app, vhost_url)
    version = await broker_version(vhost_url)
    await publish_many(vhost_url, "later.retry.1m", ["m-1"])

    # When the console's overview reads the tier's head three times
    connection = await aio_pika.connect(vhost_url)
    try:
        for _ in range(3):
            await wait_ready(vhost_url, "later.retry.1m", 1)
            [row] = await read_overview(connection, app.load_topology())
            assert row.tiers[0].depth.ready == 1
    finally:
        await connection.close()

    # Then on 4.3 the reads were nacked back: nothing counted (x-acquired-count 3 only);
    # before 4.3 each read counted, as every return does there
    [message] = await drain(vhost_url, "later.retry.1m")
    counted = 3 if version.nack_counts else None
    acquired = 3 if version.counts_acquisitions else None
    assert (message.headers.get("x-delivery-count"), message.headers.get("x-acquired-count")) == (
        counted,
        acquired,
    )
