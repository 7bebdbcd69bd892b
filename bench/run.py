"""rabbitflow's benchmark: ``python -m bench.run`` (see docs/performance.md).

In one run, interleaved over several rounds, on a fresh durable queue per case:
- consume throughput of raw aio-pika (per-message ack), raw aio-pika + pydantic, FastStream
  (pydantic argument, logger off), rabbitflow with everything on (pydantic model, SDK spans
  with a batch processor and a no-op exporter, default logging, metrics) and untraced;
- CPU µs per message and peak RSS of each consumer process (getrusage);
- publish throughput with confirms: raw aio-pika pipelined vs ``app.publish`` pipelined;
- end-to-end latency p50/p99 at a fixed 2,000 msg/s;
- ``rabbitflow run --workers 2`` vs ``--workers 1``.
Prints a table with ratios to raw aio-pika from the same run and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
CONSUME_CASES = (
    "aio_pika",
    "aio_pika_pydantic",
    "faststream",
    "rabbitflow",
    "rabbitflow_untraced",
    "rabbitflow_uvloop",
    "rabbitflow_sampled",
)
# Latency is measured with persistent messages (the broker writes them to disk, which sets
# the tail at this rate) and with transient ones (the client's own share).
LATENCY_CASES = (
    ("aio_pika", True),
    ("rabbitflow", True),
    ("aio_pika", False),
    ("rabbitflow", False),
)
# Variants of "rabbitflow" (everything on) that differ only by their environment.
CASE_ENV = {
    "rabbitflow_uvloop": {"BENCH_LOOP": "uvloop"},
    "rabbitflow_sampled": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
}
BODY = '{{"order_id": {i}, "customer": "customer-{c}", "amount": 12.5, "sent_at": {t}}}'


def _topology(queue: str, prefetch: int = 1000) -> str:
    return f'[defaults]\nqueue_type = "classic"\nprefetch = {prefetch}\n\n[queues."{queue}"]\n'


async def _declare_plain(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True)
    await connection.close()


async def _declare_rabbitflow(url: str, path: Path) -> None:
    from rabbitflow.connection import connect
    from rabbitflow.topology import derive, load_topology
    from rabbitflow.topology._declare import declare

    connection = await connect(url)
    await declare(connection, derive(load_topology(path)))
    await connection.close()


async def _publish(url: str, queue: str, count: int, window: int = 2000, padding: int = 0) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = channel.default_exchange
    for start in range(0, count, window):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        BODY.format(i=i, c=f"{i % 7}{'x' * padding}", t=0).encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                )
                for i in range(start, min(start + window, count))
            )
        )
    await connection.close()


async def _delete(url: str, queues: list[str]) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    for name in queues:
        await channel.queue_delete(name)
    await connection.close()


def _consumer(
    case: str,
    url: str,
    queue: str,
    count: int,
    topology: str = "",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.consumers", case, url, queue, str(count), topology]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{case} failed ({result.returncode}): {result.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


def _fresh_queue(url: str, prefix: str, tmp: Path, case: str) -> tuple[str, str, list[str]]:
    """A new durable queue for one case: (name, topology path or "", generated queues)."""
    queue = f"{prefix}.{uuid.uuid4().hex[:6]}"
    if not case.startswith("rabbitflow"):
        asyncio.run(_declare_plain(url, queue))
        return queue, "", []
    path = tmp / f"{queue}.toml"
    path.write_text(_topology(queue))
    asyncio.run(_declare_rabbitflow(url, path))
    return queue, str(path), _generated(queue)


def _generated(queue: str) -> list[str]:
    return [f"{queue}.dlq", *(f"{queue}.retry.{d}" for d in ("1s", "10s", "1m"))]


def consume_round(url: str, count: int, tmp: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for case in CONSUME_CASES:
        queue, topology, extra = _fresh_queue(url, f"bench.{case}", tmp, case)
        asyncio.run(_publish(url, queue, count))
        try:
            if case in CASE_ENV:
                env = CASE_ENV[case]
                results[case] = _consumer("rabbitflow", url, queue, count, topology, env=env)
            else:
                results[case] = _consumer(case, url, queue, count, topology)
        finally:
            asyncio.run(_delete(url, [queue, *extra]))
        print(
            f"  {case:22} {results[case]['rate']:9.0f} msg/s "
            f"{results[case]['cpu_us_per_msg']:6.1f} µs CPU/msg",
            flush=True,
        )
    return results


async def _publish_rate_raw(url: str, queue: str, count: int, window: int) -> float:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = channel.default_exchange
    started = time.perf_counter()
    for start in range(0, count, window):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        BODY.format(i=i, c=1, t=0).encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                    mandatory=True,
                )
                for i in range(start, min(start + window, count))
            )
        )
    elapsed = time.perf_counter() - started
    await connection.close()
    return count / elapsed


async def _publish_rate_app(url: str, queue: str, count: int, window: int, tmp: Path) -> float:
    from bench.consumers import Order
    from rabbitflow import App
    from rabbitflow._tracing import Tracing, set_tracing

    set_tracing(Tracing(None))
    path = tmp / "publish.toml"
    path.write_text(_topology(queue))
    app = App(topology=path, url=url)
    await app.publish("", queue, Order(order_id=0, customer="c", amount=1.0))  # connect
    started = time.perf_counter()
    for start in range(0, count, window):
        await asyncio.gather(
            *(
                app.publish("", queue, Order(order_id=i, customer="customer-1", amount=12.5))
                for i in range(start, min(start + window, count))
            )
        )
    elapsed = time.perf_counter() - started
    await app.close()
    return count / elapsed


def publish_round(url: str, count: int, tmp: Path) -> dict[str, float]:
    results = {}
    for case in ("aio_pika_publish", "rabbitflow_publish"):
        queue = f"bench.{case}.{uuid.uuid4().hex[:6]}"
        asyncio.run(_declare_plain(url, queue))
        try:
            if case == "aio_pika_publish":
                results[case] = asyncio.run(_publish_rate_raw(url, queue, count, 1000))
            else:
                results[case] = asyncio.run(_publish_rate_app(url, queue, count, 1000, tmp))
        finally:
            asyncio.run(_delete(url, [queue]))
        print(f"  {case:22} {results[case]:9.0f} msg/s", flush=True)
    return results


async def _paced_publish(url: str, queue: str, rate: int, seconds: float, persistent: bool) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = channel.default_exchange
    total = int(rate * seconds)
    started = time.perf_counter()
    pending = set()
    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        message = aio_pika.Message(
            BODY.format(i=i, c=1, t=repr(time.time())).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            if persistent
            else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        pending.add(asyncio.ensure_future(exchange.publish(message, routing_key=queue)))
        if len(pending) > 500:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*pending)
    await connection.close()


def latency_round(url: str, tmp: Path, rate: int, seconds: float) -> dict[str, dict[str, Any]]:
    results = {}
    for case, persistent in LATENCY_CASES:
        label = f"{case}{'' if persistent else '_transient'}"
        queue, topology, extra = _fresh_queue(url, f"bench.latency.{label}", tmp, case)
        count = int(rate * seconds)
        command = [sys.executable, "-m", "bench.consumers", case, url, queue, str(count), topology]
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)  # let the consumer connect before the clock starts
        asyncio.run(_paced_publish(url, queue, rate, seconds, persistent))
        out, _ = process.communicate(timeout=120)
        asyncio.run(_delete(url, [queue, *extra]))
        line = [x for x in out.splitlines() if x.startswith("{")][-1]
        results[label] = json.loads(line)
        print(
            f"  latency {label:22} p50 {results[label]['p50_ms']:.2f} ms "
            f"p99 {results[label]['p99_ms']:.2f} ms",
            flush=True,
        )
    return results


def workers_round(url: str, count: int, tmp: Path) -> dict[str, float]:
    results = {}
    for workers in (1, 2):
        queue = f"bench.workers{workers}.{uuid.uuid4().hex[:6]}"
        path = tmp / f"{queue}.toml"
        path.write_text(_topology(queue))
        asyncio.run(_declare_rabbitflow(url, path))
        asyncio.run(_publish(url, queue, count))
        stats = tmp / f"{queue}.stats"
        stats.mkdir()
        env = {
            **os.environ,
            "BENCH_QUEUE": queue,
            "BENCH_STATS": str(stats),
            "OTEL_TRACES_EXPORTER": "none",
        }
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rabbitflow",
                "run",
                "bench.benchapp:app",
                "--url",
                url,
                "--topology",
                str(path),
                "--workers",
                str(workers),
                "--no-declare",
                "--log-format",
                "json",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        asyncio.run(_wait_empty(url, queue, timeout=300))
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        marks = [json.loads(p.read_text()) for p in stats.iterdir()]
        first = min(m["first"] for m in marks if m["count"])
        last = max(m["last"] for m in marks if m["count"])
        handled = sum(m["count"] for m in marks)
        results[f"workers_{workers}"] = handled / (last - first)
        asyncio.run(_delete(url, [queue, *_generated(queue)]))
        print(
            f"  --workers {workers:<12} {results[f'workers_{workers}']:9.0f} msg/s "
            f"({handled} handled)",
            flush=True,
        )
    return results


async def _wait_empty(url: str, queue: str, timeout: float) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        declared = await channel.declare_queue(queue, passive=True)
        if declared.declaration_result.message_count == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # the last acks
    await connection.close()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case in CONSUME_CASES:
        runs = [r["consume"][case] for r in rounds]
        summary[case] = {
            "rate": _median([x["rate"] for x in runs]),
            "cpu_us_per_msg": _median([x["cpu_us_per_msg"] for x in runs]),
            "max_rss_mib": max(x["max_rss_mib"] for x in runs),
        }
    for case in ("aio_pika_publish", "rabbitflow_publish"):
        summary[case] = {"rate": _median([r["publish"][case] for r in rounds])}
    for case in rounds[0]["latency"]:
        summary[f"latency_{case}"] = {
            "p50_ms": _median([r["latency"][case]["p50_ms"] for r in rounds]),
            "p99_ms": _median([r["latency"][case]["p99_ms"] for r in rounds]),
        }
    for case in ("workers_1", "workers_2"):
        summary[case] = {"rate": _median([r["workers"][case] for r in rounds])}
    return summary


def table(summary: dict[str, Any]) -> str:
    base = summary["aio_pika"]["rate"]
    lines = [
        "| case | msg/s | vs raw aio-pika | CPU µs/msg | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for case in CONSUME_CASES:
        row = summary[case]
        lines.append(
            f"| consume {case} | {row['rate']:,.0f} | {row['rate'] / base:.2f}× | "
            f"{row['cpu_us_per_msg']:.1f} | {row['max_rss_mib']:.0f} |"
        )
    pub = summary["aio_pika_publish"]["rate"]
    for case in ("aio_pika_publish", "rabbitflow_publish"):
        rate = summary[case]["rate"]
        lines.append(
            f"| publish {case} (confirms, pipelined) | {rate:,.0f} | {rate / pub:.2f}× | | |"
        )
    one = summary["workers_1"]["rate"]
    for case in ("workers_1", "workers_2"):
        rate = summary[case]["rate"]
        lines.append(
            f"| rabbitflow run --{case.replace('_', ' ')} | {rate:,.0f} | "
            f"{rate / one:.2f}× of 1 worker | | |"
        )
    for key, row in summary.items():
        if key.startswith("latency_"):
            lines.append(
                f"| {key.replace('_', ' ', 1)} at 2,000 msg/s | p50 {row['p50_ms']:.2f} ms | "
                f"p99 {row['p99_ms']:.2f} ms | | |"
            )
    fast = summary["faststream"]["rate"]
    full = summary["rabbitflow"]["rate"]
    lines.append("")
    lines.append(f"rabbitflow (everything on) / FastStream: {full / fast:.2f}×")
    if "memory" in summary:
        memory = summary["memory"]
        lines.append(
            f"RSS draining 5,000 × 64 KiB (prefetch 32): {memory['rss_first_mib']:.0f} MiB at the "
            f"first message, peak {memory['max_rss_mib']:.0f} MiB, growth "
            f"{memory['rss_growth_mib']:.1f} MiB"
        )
    return "\n".join(lines)


def memory_run(url: str, tmp: Path, count: int = 5000, size_kib: int = 64) -> dict[str, Any]:
    """RSS while rabbitflow (everything on) drains ``count`` messages of ``size_kib`` KiB."""
    queue = f"bench.memory.{uuid.uuid4().hex[:6]}"
    path = tmp / f"{queue}.toml"
    path.write_text(_topology(queue, prefetch=32))
    asyncio.run(_declare_rabbitflow(url, path))
    asyncio.run(_publish(url, queue, count, window=200, padding=size_kib * 1024))
    try:
        result = _consumer("rabbitflow", url, queue, count, str(path))
    finally:
        asyncio.run(_delete(url, [queue, *_generated(queue)]))
    result["rss_growth_mib"] = result["max_rss_mib"] - result["rss_first_mib"]
    print(
        f"  memory: {count} x {size_kib} KiB, RSS at first message "
        f"{result['rss_first_mib']:.0f} MiB, peak {result['max_rss_mib']:.0f} MiB, "
        f"growth {result['rss_growth_mib']:.1f} MiB",
        flush=True,
    )
    return result


def environment() -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    broker = subprocess.run(
        ["rabbitmqctl", "version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "rabbitmq": broker or "unknown",
        **{
            name: version(name)
            for name in (
                "rabbitflow",
                "aio-pika",
                "aiormq",
                "pydantic",
                "faststream",
                "opentelemetry-sdk",
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("RABBITFLOW_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--publish-messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}", flush=True)
            rounds.append(
                {
                    "consume": consume_round(args.url, args.messages, tmp),
                    "publish": publish_round(args.url, args.publish_messages, tmp),
                    "latency": latency_round(args.url, tmp, 2000, args.latency_seconds),
                    "workers": workers_round(args.url, args.messages, tmp),
                }
            )
        print("memory", flush=True)
        memory = memory_run(args.url, tmp)
    summary = summarize(rounds)
    summary["memory"] = {
        key: memory[key] for key in ("rss_first_mib", "max_rss_mib", "rss_growth_mib")
    }
    report = {
        "environment": environment(),
        "arguments": vars(args) | {"json": str(args.json)},
        "summary": summary,
        "rounds": rounds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print()
    print(table(summary))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
