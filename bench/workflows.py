"""Workflows benchmark: ``python -m bench.workflows`` (see docs/workflows.md).

Two measurements against a real RabbitMQ (``--url``, default the local one) and a jobs store
(``--store redis|postgres``, the local ones):

- **chord**: a chord of ``--members`` members (default 1,000) and one callback, started with
  ``app.start`` and run by one worker in this process; the time from ``start`` to the
  workflow ``succeeded`` (the callback returned), and the flow-store calls per member, counted
  by a proxy around the store (the job book's own background writes are listed apart);
- **delay**: ``--delayed`` messages (default 100) published with ``delay=--delay`` (default
  2 s) on a queue with tiers of 1 s and 10 s: how late each was handled (never early).

Queues are named ``bench.wf.<random>.*`` on the vhost of the URL and deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
from pydantic import BaseModel, RootModel

from rabbitflow import App, Message, chord, group, step
from rabbitflow._worker import Worker, WorkerOptions
from rabbitflow.workflows import _store

REDIS = "redis://127.0.0.1:6379/0"
POSTGRES = "postgresql://127.0.0.1:5432/test"


class Img(BaseModel):
    id: int


class Thumb(BaseModel):
    id: int


Thumbs = RootModel[list[Thumb]]


class Counting:
    """A flow store that counts its calls."""

    def __init__(self, inner: Any, counts: Counter[str]) -> None:
        self._inner = inner
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._counts[name] += 1
            return await attribute(*args, **kwargs)

        return counted


def _jobs_store(kind: str, token: str) -> Any:
    from rabbitflow.idempotency import PostgresStore, RedisStore

    if kind == "redis":
        return RedisStore(REDIS, prefix=f"bench:{token}:")
    return PostgresStore(POSTGRES, table=f"bench_{token}")


@contextlib.asynccontextmanager
async def _worker(app: App, url: str) -> AsyncIterator[Worker]:
    worker = Worker(app, app.load_topology(), WorkerOptions(url=url, shutdown_timeout=5.0))
    task = asyncio.create_task(worker.run())
    while not worker.ready:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def _delete_queues(url: str, names: list[str]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for name in names:
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
    finally:
        await connection.close()


async def _drop_store(kind: str, token: str) -> None:
    if kind == "redis":
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS)
        try:
            keys = [key async for key in client.scan_iter(match=f"bench:{token}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
        return
    import psycopg

    async with await psycopg.AsyncConnection.connect(POSTGRES, autocommit=True) as conn:
        for suffix in ("", "_jobs", "_flows", "_flow_results"):
            await conn.execute(f"DROP TABLE IF EXISTS bench_{token}{suffix}")


async def chord_run(url: str, kind: str, members: int, prefetch: int) -> dict[str, Any]:
    token = uuid.uuid4().hex[:8]
    base = f"bench.wf.{token}"
    directory = Path(tempfile.mkdtemp())
    (directory / "topology.toml").write_text(
        f'[defaults]\nqueue_type = "quorum"\nprefetch = {prefetch}\n'
        f'retry = {{ delays = ["1s"], max_attempts = 3 }}\n\n'
        f'[queues."{base}.make"]\n[queues."{base}.done"]\n'
    )
    store = _jobs_store(kind, token)
    app = App(topology=directory / "topology.toml", url=url, jobs=store)
    counts: Counter[str] = Counter()
    build = _store._build
    _store._build = lambda backing: Counting(build(backing), counts)  # type: ignore[assignment]
    called: list[int] = []

    @app.consumer(f"{base}.make")
    async def make(img: Img) -> Thumb:
        return Thumb(id=img.id)

    @app.consumer(f"{base}.done")
    async def done(thumbs: Thumbs) -> None:
        called.append(len(thumbs.root))

    try:
        async with _worker(app, url):
            flow = group(step(f"{base}.make", Img(id=i)) for i in range(members))
            started = time.perf_counter()
            started_flow = await app.start(chord(flow, step(f"{base}.done")))
            published = time.perf_counter()
            while True:
                status = await app.jobs.get(started_flow.id)
                if status is not None and status.state.finished:
                    break
                await asyncio.sleep(0.01)
            finished = time.perf_counter()
    finally:
        _store._build = build  # type: ignore[assignment]
        await app.close()
        await store.close()
        names = [f"{base}.{name}" for name in ("make", "done")]
        await _delete_queues(url, [*names, *(f"{n}.retry.1s" for n in names)])
        await _delete_queues(url, [f"{n}.dlq" for n in names])
        await _drop_store(kind, token)
    return {
        "members": members,
        "store": kind,
        "seconds": round(finished - started, 3),
        "publish_seconds": round(published - started, 3),
        "members_per_second": round(members / (finished - started)),
        "callback_runs": len(called),
        "state": status.state.value,
        "store_calls": dict(counts),
        # Without "get": that is this benchmark polling app.jobs.get for the end.
        "store_calls_per_member": round(
            sum(n for name, n in counts.items() if name != "get") / members, 3
        ),
    }


async def delay_run(url: str, count: int, delay_ms: int) -> dict[str, Any]:
    token = uuid.uuid4().hex[:8]
    queue = f"bench.wf.{token}.later"
    directory = Path(tempfile.mkdtemp())
    (directory / "topology.toml").write_text(
        f'[queues."{queue}"]\nqueue_type = "quorum"\nprefetch = 200\n'
        'retry = { delays = ["1s", "10s"], max_attempts = 3 }\n'
    )
    app = App(topology=directory / "topology.toml", url=url)
    sent: dict[str, float] = {}
    late: list[float] = []

    @app.consumer(queue)
    async def later(message: Message) -> None:
        late.append(time.time() - sent[message.message_id or ""] - delay_ms / 1000)

    try:
        async with _worker(app, url):
            for i in range(count):
                key = f"d{i}"
                sent[key] = time.time()
                await app.publish("", queue, {"i": i}, message_id=key, delay=delay_ms)
            deadline = time.monotonic() + delay_ms / 1000 + 30
            while len(late) < count and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await app.close()
        await _delete_queues(
            url, [queue, f"{queue}.retry.1s", f"{queue}.retry.10s", f"{queue}.dlq"]
        )
    ms = sorted(value * 1000 for value in late)
    return {
        "messages": count,
        "delay_ms": delay_ms,
        "handled": len(ms),
        "early": sum(1 for value in ms if value < 0),
        "late_ms_min": round(ms[0], 1),
        "late_ms_p50": round(statistics.median(ms), 1),
        "late_ms_p99": round(ms[int(len(ms) * 0.99) - 1], 1),
        "late_ms_max": round(ms[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--store", choices=("redis", "postgres"), default="redis")
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--delayed", type=int, default=100)
    parser.add_argument("--delay", type=int, default=2000, help="milliseconds")
    parser.add_argument("--only", choices=("chord", "delay"))
    args = parser.parse_args()
    if args.only in (None, "chord"):
        print(asyncio.run(chord_run(args.url, args.store, args.members, args.prefetch)))
    if args.only in (None, "delay"):
        print(asyncio.run(delay_run(args.url, args.delayed, args.delay)))


if __name__ == "__main__":
    main()
