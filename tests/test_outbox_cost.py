"""The outbox relay's database cost per row, gated like a baseline (bench/outbox_baseline.json):
statements (one round trip each) and dead tuples, counts that do not depend on the machine.
WAL bytes depend on what else writes to the server: ``python -m bench.outbox`` reports them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.outbox import drain, sink_queue, write_backlog
from rabbitflow import App
from tests.support.outbox import outbox_in_own_schema

pytestmark = pytest.mark.broker

BASELINE = json.loads(
    (Path(__file__).resolve().parent.parent / "bench" / "outbox_baseline.json").read_text()
)


async def test_the_relay_spends_no_more_round_trips_per_row_than_the_baseline(
    vhost_url: str,
) -> None:
    rows, batch = BASELINE["rows"], BASELINE["batch_size"]
    async with outbox_in_own_schema(batch_size=batch) as outbox:
        connection, _ = await sink_queue(vhost_url)  # the exchange the rows go to, and a queue
        await write_backlog(outbox, rows, per_transaction=500)
        app = App(url=vhost_url, outbox=outbox)
        try:
            drained = await asyncio.wait_for(drain(outbox, app, rows), 60)
        finally:
            await app.close()
            await connection.close()
        per_row = drained["statements"] / rows
        assert per_row <= BASELINE["relay_statements_per_row"], (
            f"{drained['statements']} statements for {rows} rows: {per_row:.4f} per row, over the "
            f"baseline of {BASELINE['relay_statements_per_row']} (bench/outbox_baseline.json)"
        )
        # Each row is written twice at most after its insert (leased, then sent): the dead
        # tuples PostgreSQL's autovacuum has to clean up. Table counts are reported when a
        # backend ends or goes idle: the relay's connection is closed by now.
        await asyncio.sleep(1.5)
        async with await outbox.connect() as conn:
            cursor = await conn.execute(
                "SELECT n_dead_tup + n_tup_del FROM pg_stat_user_tables "
                "WHERE schemaname = %s AND relname = %s",
                (outbox.schema, outbox.table),
            )
            row = await cursor.fetchone()
        assert row is not None
        assert row[0] / rows <= BASELINE["dead_tuples_per_row_at_most"]
