"""The outbox's benchmark: ``python -m bench.outbox`` produces the figures of docs/outbox.md.

In one run, against the given RabbitMQ vhost and PostgreSQL (each round on a fresh schema
and queue):

- relay throughput: a committed backlog of ``--rows`` rows drained by one relay, from its
  start to the last row marked sent (commit → confirm), against ``app.publish_many`` of the
  same messages on the same connection kind, in batches of the same size;
- commit-to-handler latency p50/p99 at a fixed rate (``--rate``, default 1,000 rows/s), one
  row per transaction, measured from each commit's return to the consumer's receipt;
- database cost per row: the relay's statements (each one round trip), WAL bytes written by
  the writes and by the relay (``pg_current_wal_lsn``), dead tuples left (``pg_stat_user_tables``).

The statement counts are deterministic: ``bench/outbox_baseline.json`` holds them and
``tests/test_outbox_cost.py`` fails when a change makes them grow. WAL bytes are read from a
server other sessions may write to at the same time: run on a quiet server for the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from typing import Any

import aio_pika
import psycopg

from rabbitflow import App
from rabbitflow.outbox import PostgresOutbox

EXCHANGE = "bench-outbox"


async def _outbox(dsn: str, **options: Any) -> PostgresOutbox:
    outbox = PostgresOutbox(dsn, schema=f"rf_bench_{uuid.uuid4().hex[:8]}", **options)
    await outbox.install()
    return outbox


async def _drop(outbox: PostgresOutbox) -> None:
    async with await outbox.connect() as conn:
        await conn.execute(f"DROP SCHEMA IF EXISTS {outbox.schema} CASCADE")


async def sink_queue(
    url: str,
) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractQueue]:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=2000)
    exchange = await channel.declare_exchange(EXCHANGE, "topic")
    queue = await channel.declare_queue(f"bench-outbox-{uuid.uuid4().hex[:6]}", exclusive=True)
    await queue.bind(exchange, "#")
    return connection, queue


async def _lsn(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


async def _dead_tuples(outbox: PostgresOutbox) -> int:
    await asyncio.sleep(1.2)  # backends report their table counts at most once a second
    async with await outbox.connect() as conn:
        cursor = await conn.execute(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s",
            (outbox.schema, outbox.table),
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def write_backlog(outbox: PostgresOutbox, rows: int, per_transaction: int = 1000) -> None:
    """``rows`` messages of about 100 bytes, committed ``per_transaction`` at a time."""
    async with await psycopg.AsyncConnection.connect(outbox.dsn) as conn:
        for start in range(0, rows, per_transaction):
            async with conn.transaction():
                for n in range(start, min(rows, start + per_transaction)):
                    await outbox.publish(conn, EXCHANGE, "order.created", _order(n))


def _order(n: int) -> dict[str, Any]:
    return {"order_id": n, "customer": "c-42", "amount": 19.5, "currency": "EUR"}


async def drain(outbox: PostgresOutbox, app: App, rows: int) -> dict[str, float]:
    """One relay drains ``rows`` committed rows: seconds, and its statements."""
    relay = outbox.relay(app)
    started = time.perf_counter()
    task = asyncio.ensure_future(relay.run())
    while relay.published < rows:  # noqa: ASYNC110 - a 1 ms poll: the figure, not a wait
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    statements = relay.statements
    relay.stop()
    await task
    return {"seconds": elapsed, "statements": statements}


async def cost_round(dsn: str, url: str, rows: int, batch: int) -> dict[str, float]:
    """The database cost of ``rows`` rows: written in transactions of 100, relayed."""
    outbox = await _outbox(dsn, batch_size=batch)
    connection, _ = await sink_queue(url)
    app = App(url=url, outbox=outbox)
    try:
        before = await _lsn(dsn)
        await write_backlog(outbox, rows, per_transaction=100)
        written = await _lsn(dsn)
        drained = await drain(outbox, app, rows)
        relayed = await _lsn(dsn)
        dead = await _dead_tuples(outbox)
    finally:
        await app.close()
        await connection.close()
        await _drop(outbox)
    return {
        "relay_statements_per_row": drained["statements"] / rows,
        "writer_statements_per_row": 1.0,  # one INSERT on the caller's connection
        "writer_wal_bytes_per_row": (written - before) / rows,
        "relay_wal_bytes_per_row": (relayed - written) / rows,
        "dead_tuples_per_row": dead / rows,
    }


async def throughput_round(dsn: str, url: str, rows: int, batch: int) -> dict[str, float]:
    outbox = await _outbox(dsn, batch_size=batch)
    connection, queue = await sink_queue(url)
    app = App(url=url, outbox=outbox)
    try:
        await write_backlog(outbox, rows)
        await app.publish(EXCHANGE, "warm-up", {})  # the connection, as the relay reuses it
        relayed = await drain(outbox, app, rows)
        payloads = [_order(n) for n in range(rows)]
        started = time.perf_counter()
        for start in range(0, rows, batch):
            await app.publish_many(EXCHANGE, "order.created", payloads[start : start + batch])
        published = time.perf_counter() - started
        await queue.purge()
    finally:
        await app.close()
        await connection.close()
        await _drop(outbox)
    relay_rate, publish_rate = rows / relayed["seconds"], rows / published
    return {
        "relay_rows_per_s": relay_rate,
        "publish_many_msgs_per_s": publish_rate,
        "ratio": relay_rate / publish_rate,
    }


async def latency_round(dsn: str, url: str, rate: int, seconds: float) -> dict[str, float]:
    outbox = await _outbox(dsn)
    connection, queue = await sink_queue(url)
    app = App(url=url, outbox=outbox)
    committed: dict[str, float] = {}
    received: dict[str, float] = {}

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received[str(message.message_id)] = time.perf_counter()
        await message.ack()

    await queue.consume(on_message)
    try:
        async with outbox.relaying(app):
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                total = int(rate * seconds)
                start = time.perf_counter()
                for n in range(total):
                    due = start + n / rate
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    async with conn.transaction():
                        message_id = await outbox.publish(
                            conn, EXCHANGE, "order.created", _order(n)
                        )
                    committed[message_id] = time.perf_counter()
            deadline = time.perf_counter() + 30
            while len(received) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        await app.close()
        await connection.close()
        await _drop(outbox)
    latencies = sorted((received[i] - committed[i]) * 1000 for i in committed if i in received)
    return {
        "rate": rate,
        "received": len(latencies) / len(committed),
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
    }


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}–{max(values):,.1f})"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        figures = {
            "throughput": await throughput_round(args.dsn, args.url, args.rows, args.batch),
            "latency": await latency_round(args.dsn, args.url, args.rate, args.latency_seconds),
            "cost": await cost_round(args.dsn, args.url, 2_000, args.batch),
        }
        print(f"round {number}: {json.dumps(figures)}", flush=True)
        rounds.append(figures)
    return {"rounds": rounds}


def table(rounds: list[dict[str, Any]]) -> str:
    def column(section: str, name: str) -> list[float]:
        return [r[section][name] for r in rounds]

    lines = [
        "| figure | median (min–max) |",
        "|---|---|",
        f"| relay, rows/s commit → confirm | {_spread(column('throughput', 'relay_rows_per_s'))} |",
        f"| app.publish_many, msg/s | {_spread(column('throughput', 'publish_many_msgs_per_s'))} |",
        f"| relay / publish_many | {_spread(column('throughput', 'ratio'))} |",
        f"| commit → handler p50, ms | {_spread(column('latency', 'p50_ms'))} |",
        f"| commit → handler p99, ms | {_spread(column('latency', 'p99_ms'))} |",
    ]
    for name in (
        "relay_statements_per_row",
        "writer_statements_per_row",
        "writer_wal_bytes_per_row",
        "relay_wal_bytes_per_row",
        "dead_tuples_per_row",
    ):
        values = column("cost", name)
        lines.append(f"| {name.replace('_', ' ')} | {statistics.median(values):,.4g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("RABBITFLOW_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "RABBITFLOW_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rate", type=int, default=1_000)
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(table(result["rounds"]))


if __name__ == "__main__":
    main()
