"""The outbox relay through faults (chaos stage): a relay killed with SIGKILL in the middle
of a batch, the broker out of reach, PostgreSQL restarted. Nothing committed is lost; a crash
costs at most one batch of duplicates, each with its row's message_id."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rabbitflow import App
from tests.support.network import BrokerGate
from tests.support.outbox import (
    PrivatePostgres,
    Sink,
    count_rows,
    outbox_in_own_schema,
    write_rows,
)
from tests.support.processes import ROOT
from tests.support.services import POSTGRES_URL

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BATCH = 500


@pytest.mark.crash
async def test_a_relay_killed_mid_batch_loses_nothing_and_repeats_at_most_a_batch(
    vhost_url: str, tmp_path: Path
) -> None:
    async with (
        outbox_in_own_schema(lease="2s", publish_timeout="1s") as outbox,
        Sink(vhost_url) as sink,
    ):
        ids = await write_rows(outbox, 20_000, per_transaction=2_000)
        env = {
            **os.environ,
            "RF_OUTBOX_DSN": POSTGRES_URL,
            "RF_OUTBOX_SCHEMA": outbox.schema or "",
            "RF_OUTBOX_BATCH": str(BATCH),
            "RF_OUTBOX_LEASE": "2s",
            "RF_OUTBOX_PUBLISH_TIMEOUT": "1s",
        }
        command = [sys.executable, "-m", "rabbitflow", "outbox", "relay"]
        # Given a relay in a process of its own, publishing
        with (tmp_path / "relay.log").open("wb") as out:
            relay = subprocess.Popen(  # noqa: ASYNC220 - killed, not awaited
                [*command, "tests.apps.outbox_app:app", "--url", vhost_url, "--log-format", "json"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            while len(sink.received) < 2_000:
                assert relay.poll() is None, (tmp_path / "relay.log").read_text()[-2000:]
                await asyncio.sleep(0.002)
            # When it is killed in the middle of its work
            relay.send_signal(signal.SIGKILL)
        finally:
            relay.kill()
            relay.wait(10)
        await asyncio.sleep(0.2)
        at_kill = len(set(sink.ids))
        assert at_kill < len(ids), "the relay finished before the kill: nothing was tested"
        # Then another relay publishes the rest, the killed one's batch after its lease
        app = App(url=vhost_url, outbox=outbox)
        async with outbox.relaying(app):
            await sink.wait_for_ids(ids, timeout=90)
            await asyncio.sleep(0.5)
        await app.close()
        assert set(sink.ids) == set(ids)
        assert 0 <= sink.duplicates() <= BATCH
        assert await count_rows(outbox, "pending") == 0


@pytest.mark.chaos
async def test_rows_wait_while_the_broker_is_out_of_reach_then_flow(vhost_url: str) -> None:
    async with outbox_in_own_schema() as outbox, Sink(vhost_url) as sink, BrokerGate() as gate:
        app = App(url=gate.url(vhost_url), outbox=outbox)
        async with outbox.relaying(app) as relay:
            before = await write_rows(outbox, 100, prefix="before")
            await sink.wait_for_ids(before)
            # When the broker is cut off (open connections too) for 10 s
            await gate.close()
            during = await write_rows(outbox, 100, prefix="during")
            await asyncio.sleep(10)
            # Then the rows wait, none lost and none parked
            assert not set(during) & set(sink.ids)
            assert await count_rows(outbox, "pending") == 100
            # And once it is back they flow
            await gate.open()
            await sink.wait_for_ids(during, timeout=60)
        await app.close()
        assert sink.duplicates() == 0
        assert relay.parked == 0


@pytest.mark.chaos
async def test_the_relay_recovers_when_postgresql_restarts(vhost_url: str) -> None:
    server = PrivatePostgres()
    await asyncio.to_thread(server.init)
    await asyncio.to_thread(server.start)
    try:
        async with outbox_in_own_schema(server.dsn) as outbox, Sink(vhost_url) as sink:
            app = App(url=vhost_url, outbox=outbox)
            async with outbox.relaying(app) as relay:
                before = await write_rows(outbox, 100, prefix="before", dsn=server.dsn)
                await sink.wait_for_ids(before)
                # When PostgreSQL stops at once (no shutdown checkpoint) and starts again
                await asyncio.to_thread(server.stop)
                await asyncio.sleep(2)
                await asyncio.to_thread(server.start)
                # Then rows committed after the restart are published too
                after = await write_rows(outbox, 100, prefix="after", dsn=server.dsn)
                await sink.wait_for_ids(after, timeout=60)
            await app.close()
            assert set(sink.ids) == set(before) | set(after)
            assert relay.published == 200
    finally:
        await asyncio.to_thread(server.remove)
