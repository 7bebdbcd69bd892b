"""Request/reply benchmark: ``python -m bench.rpc`` (see docs/performance.md).

One responder process answers every request (``--server aio_pika``: a hand-written aio-pika
responder; ``--server rabbitflow``: a rabbitflow handler returning its reply under
``rabbitflow run``). Against it, in the same run and interleaved over ``--rounds``, two
callers each keep 1, 10 and 100 requests in flight for ``--seconds``:

- ``aio_pika``: a hand-written aio-pika RPC client (direct reply-to, futures by
  correlation id, publisher confirms, mandatory), the usual tutorial code;
- ``rabbitflow``: ``app.request()``.

Prints requests per second and p50/p99 latency per caller and concurrency, with the ratio
to aio-pika from the same run. Bounded: at most ``rounds × 2 × 3 × seconds`` of traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "bench.rpc"
CONCURRENCY = (1, 10, 100)
CALLERS = ("aio_pika", "rabbitflow")

SERVER_APP = f'''
from rabbitflow import App

app = App()


@app.consumer("{QUEUE}")
async def answer(request: dict) -> dict:
    return {{"n": request["n"], "ok": True}}
'''
SERVER_TOPOLOGY = f"""
[queues."{QUEUE}"]
queue_type = "classic"
durable = false
auto_delete = false
prefetch = 256
retry = false
dead_letter = false
"""


# -- the responders --------------------------------------------------------------------------


async def aio_pika_server(url: str) -> None:
    """The hand-written responder: reply, then ack."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=256)
    queue = await channel.declare_queue(QUEUE, durable=False)

    async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        request = json.loads(message.body)
        reply = json.dumps({"n": request["n"], "ok": True}).encode()
        await channel.default_exchange.publish(
            aio_pika.Message(
                reply, correlation_id=message.correlation_id, content_type="application/json"
            ),
            routing_key=message.reply_to or "",
            mandatory=False,
        )
        await message.ack()

    await queue.consume(on_request)
    print("ready", flush=True)
    await asyncio.Future()


def start_server(kind: str, url: str, tmp: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "RABBITFLOW_URL": url}
    if kind == "aio_pika":
        command = [sys.executable, "-m", "bench.rpc", "--serve", "--url", url]
    else:
        (tmp / "rpcserver.py").write_text(SERVER_APP)
        (tmp / "topology.toml").write_text(SERVER_TOPOLOGY)
        env["PYTHONPATH"] = f"{tmp}{os.pathsep}{ROOT}"
        command = [str(Path(sys.executable).parent / "rabbitflow"), "run", "rpcserver:app"]
        command += ["--topology", str(tmp / "topology.toml"), "--url", url]
    process = subprocess.Popen(
        command,
        cwd=tmp if kind != "aio_pika" else ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return process


async def wait_consumed(url: str, timeout: float = 30.0) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                queue = await channel.declare_queue(QUEUE, passive=True)
                if queue.declaration_result.consumer_count:
                    return
            except aio_pika.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()
            await asyncio.sleep(0.2)
        raise RuntimeError("the responder did not start consuming")
    finally:
        await connection.close()


async def delete_queue(url: str) -> None:
    """Leave nothing behind on the broker."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(QUEUE)
    finally:
        await connection.close()


# -- the callers -----------------------------------------------------------------------------


class HandWrittenClient:
    """The aio-pika RPC client people write from the tutorial, with direct reply-to."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[bytes]] = {}

    async def open(self, url: str) -> None:
        self.connection = await aio_pika.connect(url)
        self.channel = await self.connection.channel()
        reply_queue = await self.channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_queue.consume(self.on_reply, no_ack=True)

    async def on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.futures.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(self, n: int) -> Any:
        correlation_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.futures[correlation_id] = future
        try:
            await self.channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps({"n": n}).encode(),
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to="amq.rabbitmq.reply-to",
                ),
                routing_key=QUEUE,
            )
            return json.loads(await asyncio.wait_for(future, 10))
        finally:
            self.futures.pop(correlation_id, None)

    async def close(self) -> None:
        await self.connection.close()


async def measure(
    call: Callable[[int], Awaitable[Any]], in_flight: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(worker: int) -> None:
        n = worker
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            reply = await call(n)
            latencies.append(time.perf_counter() - started)
            assert reply["n"] == n, reply
            n += in_flight

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(loop(worker) for worker in range(in_flight)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        # The caller's own CPU per request (this process runs only the caller): less
        # sensitive to a busy machine than the rate.
        "cpu_us": cpu / len(latencies) * 1e6,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "requests": len(latencies),
    }


async def caller_round(url: str, caller: str, seconds: float) -> dict[int, dict[str, float]]:
    results: dict[int, dict[str, float]] = {}
    if caller == "aio_pika":
        client = HandWrittenClient()
        await client.open(url)
        try:
            for in_flight in CONCURRENCY:
                await measure(client.call, in_flight, 0.3)  # warm-up
                results[in_flight] = await measure(client.call, in_flight, seconds)
        finally:
            await client.close()
        return results
    from rabbitflow import App

    app = App(url=url, topology="missing.toml")

    async def call(n: int) -> Any:
        return await app.request("", QUEUE, {"n": n}, timeout=10)

    try:
        for in_flight in CONCURRENCY:
            await measure(call, in_flight, 0.3)
            results[in_flight] = await measure(call, in_flight, seconds)
    finally:
        await app.close()
    return results


def table(runs: dict[str, dict[int, list[dict[str, float]]]], server: str) -> str:
    lines = [
        f"request/reply, responder: {server} (medians over rounds)",
        f"{'caller':<12}{'in flight':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU µs/req':>12}{'vs aio-pika':>13}",
    ]
    for in_flight in CONCURRENCY:
        base = statistics.median(r["rps"] for r in runs["aio_pika"][in_flight])
        for caller in CALLERS:
            rounds = runs[caller][in_flight]
            rps = statistics.median(r["rps"] for r in rounds)
            p50 = statistics.median(r["p50_ms"] for r in rounds)
            p99 = statistics.median(r["p99_ms"] for r in rounds)
            cpu = statistics.median(r["cpu_us"] for r in rounds)
            lines.append(
                f"{caller:<12}{in_flight:>10}{rps:>10.0f}{p50:>9.2f}{p99:>9.2f}{cpu:>12.0f}"
                f"{rps / base:>12.2f}x"
            )
    return "\n".join(lines)


async def bench(url: str, server: str, rounds: int, seconds: float) -> dict[str, Any]:
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        c: {n: [] for n in CONCURRENCY} for c in CALLERS
    }
    with tempfile.TemporaryDirectory() as tmp:
        process = start_server(server, url, Path(tmp))
        try:
            await wait_consumed(url)
            for _ in range(rounds):
                for caller in CALLERS:
                    for in_flight, result in (await caller_round(url, caller, seconds)).items():
                        runs[caller][in_flight].append(result)
        finally:
            process.terminate()
            process.wait(10)
            await delete_queue(url)
    print(table(runs, server))
    return {"server": server, "rounds": rounds, "seconds": seconds, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("RABBITFLOW_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--server", choices=("aio_pika", "rabbitflow"), default="aio_pika")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(aio_pika_server(args.url))
        return
    result = asyncio.run(bench(args.url, args.server, args.rounds, args.seconds))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
