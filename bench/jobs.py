"""What tracking jobs costs a consumer: ``python -m bench.jobs``.

One run measures, each case in a process of its own and the cases interleaved round by
round: an untracked consumer, the same consumer with ``track=True`` on Redis, and on
PostgreSQL (the shared services of the test machine). Each case consumes N pre-published
messages from a fresh classic queue at prefetch 100 with a handler that returns a small
dict; the rate is from the first delivery to the last handled message. For tracked cases
``statuses_rate`` is up to the moment the last status change (``succeeded``) was written
too: the writer runs behind the acks, and this says by how much.

    .venv/bin/python -m bench.jobs                       # 3 rounds of 20,000 messages
    .venv/bin/python -m bench.jobs --messages 50000 --rounds 5 --json /tmp/jobs.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.consumers import Meter

PREFETCH = 100
CASES = ("untracked", "tracked_redis", "tracked_postgres")
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
TOPOLOGY = """
[queues.{queue}]
queue_type = "classic"
prefetch = {prefetch}
track = {track}
"""


def _store(case: str, space: str) -> Any:
    from rabbitflow.idempotency import PostgresStore, RedisStore

    if case == "tracked_redis":
        return RedisStore(REDIS_URL, prefix=f"{space}:")
    if case == "tracked_postgres":
        return PostgresStore(POSTGRES_URL, table=space)
    return None


async def consume(case: str, url: str, count: int) -> dict[str, Any]:
    """One case: declare, publish ``count`` messages, consume them, clean up."""
    import aio_pika

    from rabbitflow import App
    from rabbitflow._logging import configure_logging
    from rabbitflow._tracing import Tracing, set_tracing
    from rabbitflow._worker import Worker, WorkerOptions
    from rabbitflow.topology import declare, derive, load_topology

    configure_logging("json", "warning")
    set_tracing(Tracing(None))
    space = f"bench_jobs_{uuid.uuid4().hex[:8]}"
    queue = space.replace("_", "-")
    folder = Path(tempfile.mkdtemp())
    path = folder / "topology.toml"
    tracked = case != "untracked"
    path.write_text(TOPOLOGY.format(queue=queue, prefetch=PREFETCH, track=str(tracked).lower()))
    topology = load_topology(path)
    store = _store(case, space)
    app = App(path, url=url, jobs=store) if store is not None else App(path, url=url)
    meter = Meter(count)

    @app.consumer(queue)
    async def handle(order: dict[str, Any]) -> dict[str, Any]:
        meter.tick()
        return {"order_id": order["order_id"], "ok": True}

    connection = await aio_pika.connect(url)
    try:
        await declare(connection, derive(topology))
        async with app:
            for start in range(0, count, 5000):
                size = min(5000, count - start)
                await app.publish_many(
                    "",
                    queue,
                    [{"order_id": n, "customer": "c", "amount": 1.5} for n in range(size)],
                )
        worker = Worker(app, topology, WorkerOptions(url=url, declare=False))
        task = asyncio.create_task(worker.run())
        await meter.done.wait()
        report = meter.report()
        if tracked:
            book: Any = app.jobs
            while book.pending:
                await book.flush()
            written = time.perf_counter() - meter.first
            report["statuses_rate"] = (count - 1) / written
        worker.stop()
        await task
    finally:
        channel = await connection.channel()
        for each in derive(topology).queues:
            await channel.queue_delete(each.name)
        await connection.close()
        if store is not None:
            await _drop(case, space)
    report["case"] = case
    return report


async def _drop(case: str, space: str) -> None:
    if case == "tracked_redis":
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(match=f"{space}:*")]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await client.aclose()
    elif case == "tracked_postgres":
        import psycopg

        async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {space}_jobs")
            await conn.execute(f"DROP TABLE IF EXISTS {space}")


def run_case(case: str, url: str, count: int) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.jobs",
            "--case",
            case,
            "--url",
            url,
            "--messages",
            str(count),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--case", choices=CASES, help="Run one case in this process.")
    parser.add_argument("--json", type=Path, help="Also write every round's figures here.")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(asyncio.run(consume(args.case, args.url, args.messages))), flush=True)
        return
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        # Each round in another order: no case always runs after the same one.
        for case in CASES[number % 3 :] + CASES[: number % 3]:
            result = run_case(case, args.url, args.messages)
            result["round"] = number + 1
            rounds.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    untracked = statistics.median(r["rate"] for r in rounds if r["case"] == "untracked")
    print(f"{'case':<18} {'msg/s':>8} {'× untracked':>12} {'cpu µs/msg':>11} {'statuses/s':>11}")
    for case in CASES:
        mine = [r for r in rounds if r["case"] == case]
        rate = statistics.median(r["rate"] for r in mine)
        cpu = statistics.median(r["cpu_us_per_msg"] for r in mine)
        written = [r["statuses_rate"] for r in mine if "statuses_rate" in r]
        statuses = f"{statistics.median(written):>11.0f}" if written else f"{'-':>11}"
        print(f"{case:<18} {rate:>8.0f} {rate / untracked:>12.2f} {cpu:>11.1f} {statuses}")
    print(f"median of {args.rounds} rounds of {args.messages} messages, prefetch {PREFETCH}")
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
