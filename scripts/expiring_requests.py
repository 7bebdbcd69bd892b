"""Figures for requests whose caller gave up (docs/reliability.md, "Requests that expire").

    python scripts/expiring_requests.py --url amqp://guest:guest@127.0.0.1:5672/

Runs against the broker at ``--url`` (its vhost must exist), with queues of its own that it
deletes at the end, and a rabbitflow worker in this process:

1. **backlog**: ``--requests`` concurrent ``app.request(timeout=0.3)`` to a 50 ms handler at
   prefetch 1; how many timed out, how many handlers ran, and how many of those started after
   their caller had given up; then one fresh request with a 3 s timeout.
2. **no consumer**: one request (timeout 0.3 s) to a queue nobody consumes; its depth over time.
3. **tiny timeouts**: ``--tiny`` requests with timeouts of 1-100 ms to a queue nobody
   consumes; how many reached the broker, and whether ``RequestTimeout.sent`` says which.

Written against the public API only, so it also measures older releases (``sent`` is then
reported as unknown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from rabbitflow import App, RequestTimeout
from rabbitflow._worker import Worker, WorkerOptions
from rabbitflow.topology import derive, load_topology
from rabbitflow.topology._declare import declare

SLOW, IDLE, TINY = "exp.slow", "exp.idle", "exp.tiny"


def topology(suffix: str) -> str:
    return f"""
[queues."{SLOW}.{suffix}"]
prefetch = 1
retry = false

[queues."{IDLE}.{suffix}"]
retry = false

[queues."{TINY}.{suffix}"]
retry = false
"""


async def depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def backlog(url: str, slow: str, count: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    started: dict[str, float] = {}
    server = App(url=url)

    @server.consumer(slow)
    async def answer(request: dict[str, str]) -> dict[str, bool]:
        started[request["id"]] = loop.time()
        await asyncio.sleep(0.05)
        return {"ok": True}

    caller = App(url=url, topology="missing.toml")
    gave_up: dict[str, float] = {}
    answered: list[str] = []

    async def one(n: int) -> None:
        key = f"r{n}"
        deadline = loop.time() + 0.3
        try:
            await caller.request("", slow, {"id": key}, timeout=0.3)
            answered.append(key)
        except RequestTimeout:
            gave_up[key] = deadline

    worker = Worker(server, server.load_topology(), WorkerOptions(url=url, shutdown_timeout=5))
    task = asyncio.create_task(worker.run())
    for _ in range(300):  # the worker consumes within 15 s
        if worker.ready:
            break
        await asyncio.sleep(0.05)
    try:
        await caller.request("", slow, {"id": "warm-up"}, timeout=5)
        started.clear()
        await asyncio.gather(*(one(n) for n in range(count)))
        every_caller_gone = max(gave_up.values(), default=loop.time())
        fresh_at = loop.time()
        try:
            await caller.request("", slow, {"id": "fresh"}, timeout=3)
            fresh = f"answered in {loop.time() - fresh_at:.3f} s"
        except RequestTimeout:
            fresh = "timed out"
        # Until the backlog is worked off: no handler started for a whole second (20 s at most).
        for _ in range(20):
            before = len(started)
            await asyncio.sleep(1.0)
            if len(started) == before:
                break
        ran = [key for key in started if key != "fresh"]
        late = [key for key in ran if key in gave_up and started[key] > gave_up[key]]
        after_all = [key for key in ran if started[key] > every_caller_gone]
    finally:
        worker.stop()
        await task
        await caller.close()
    return {
        "requests": count,
        "timed_out": len(gave_up),
        "answered": len(answered),
        "handlers_ran": len(ran),
        "ran_after_their_caller_gave_up": len(late),
        "ran_after_every_caller_had_gone": len(after_all),
        "fresh_request_3s": fresh,
    }


async def no_consumer(url: str, idle: str) -> dict[str, Any]:
    caller = App(url=url, topology="missing.toml")
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        try:
            await caller.request("", idle, {"id": "nobody"}, timeout=0.3)
        except RequestTimeout as exc:
            outcome = f"RequestTimeout(sent={getattr(exc, 'sent', 'unknown')})"
        sampled: dict[str, Any] = {"request": outcome}
        begun = time.monotonic()
        for at in (0.2, 1.0, 2.0, 5.0):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - begun)))
            sampled[f"in queue at +{at:g}s"] = await depth(channel, idle)
        sampled["in its DLQ at +5s"] = await depth(channel, f"{idle}.dlq")
        return sampled
    finally:
        await connection.close()
        await caller.close()


async def tiny(url: str, queue: str, count: int) -> dict[str, Any]:
    caller = App(url=url, topology="missing.toml")
    rng = random.Random(22)
    flags: dict[str, object] = {}

    async def one(n: int) -> None:
        key = f"t{n}"
        try:
            await caller.request("", queue, {"n": n}, timeout=rng.uniform(0.001, 0.1),
                                 message_id=key)  # fmt: skip
            flags[key] = "answered?"
        except RequestTimeout as exc:
            flags[key] = getattr(exc, "sent", "unknown")

    try:
        # The connection and the reply consumer are opened before the timed calls.
        with contextlib.suppress(RequestTimeout):
            await caller.request("", queue, {"n": -1}, timeout=0.5, message_id="warm-up")
        await asyncio.gather(*(one(n) for n in range(count)), return_exceptions=True)
    finally:
        await caller.close()
    await asyncio.sleep(3.0)  # requests that reached the queue expire into its DLQ (if they do)
    reached: set[str] = set()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for name in (queue, f"{queue}.dlq"):
            source = await channel.declare_queue(name, passive=True)
            while (message := await source.get(no_ack=True, fail=False)) is not None:
                reached.add(str(message.message_id))
    finally:
        await connection.close()
    reached.discard("warm-up")
    said_sent = {key for key, sent in flags.items() if sent is True}
    said_not_sent = {key for key, sent in flags.items() if sent is False}
    return {
        "requests": count,
        "timed_out": sum(1 for v in flags.values() if v != "answered?"),
        "reached_the_queue": len(reached),
        "sent=True": len(said_sent),
        "sent=False": len(said_not_sent),
        "sent=True but not in the queue": len(said_sent - reached),
        "sent=False but in the queue": len(said_not_sent & reached),
    }


async def measure(args: argparse.Namespace, folder: str, suffix: str) -> None:
    declarations = derive(load_topology(Path(folder, "topology.toml")))
    connection = await aio_pika.connect(args.url)
    try:
        await declare(connection, declarations)
        print("backlog:", await backlog(args.url, f"{SLOW}.{suffix}", args.requests))
        print("no consumer:", await no_consumer(args.url, f"{IDLE}.{suffix}"))
        print("tiny timeouts:", await tiny(args.url, f"{TINY}.{suffix}", args.tiny))
    finally:
        channel = await connection.channel()
        for spec in declarations.queues:
            await channel.queue_delete(spec.name)
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tiny", type=int, default=1000)
    args = parser.parse_args()
    suffix = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "topology.toml").write_text(topology(suffix))
        os.chdir(folder)  # the worker's App reads ./topology.toml
        asyncio.run(measure(args, folder, suffix))


if __name__ == "__main__":
    main()
