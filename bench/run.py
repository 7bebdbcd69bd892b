"""rabbitflow's benchmark: ``python -m bench.run`` produces every figure of docs/performance.md.

In one run, interleaved over several rounds, on a fresh durable classic queue per case:
- consume throughput of raw aio-pika (per-message ack), raw aio-pika + pydantic, the peers
  (FastStream logger off; FastStream with its telemetry middleware and default logging;
  taskiq with taskiq-aio-pika and its OpenTelemetry middleware; Dramatiq's RabbitmqBroker),
  rabbitflow with everything on (pydantic model, SDK spans with a batch processor and a
  no-op exporter, default logging, metrics), untraced, under uvloop and 10 % sampled;
- CPU µs per message and peak RSS of each consumer process;
- publish throughput with confirms: raw aio-pika pipelined with ``asyncio.gather`` vs
  ``app.publish`` pipelined the same way vs ``app.publish_many``;
- end-to-end latency p50/p99 at a fixed 2,000 msg/s;
- ``rabbitflow run --workers 2`` vs ``--workers 1``, with the CPU of the broker (beam.smp)
  and of the workers read from /proc during the drain.
Prints a table (median and min–max over the rounds, ratios to raw aio-pika from the same
round) to paste into docs/performance.md, and writes every round to JSON.
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

from bench import procstat

ROOT = Path(__file__).resolve().parent.parent
CONSUME_CASES = (
    "aio_pika",
    "aio_pika_pydantic",
    "faststream",
    "faststream_otel",
    "taskiq",
    "dramatiq",
    "rabbitflow",
    "rabbitflow_untraced",
    "rabbitflow_uvloop",
    "rabbitflow_sampled",
    "rabbitflow_full",
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
# The same order for the peers that publish through their own client.
BODY_FIELDS = {"customer": "customer-1", "amount": 12.5}
# Peers whose queue is filled by their own client (their own message format).
OWN_FORMAT = ("taskiq", "dramatiq")
PUBLISH_CASES = (
    "aio_pika_gather",
    "app_publish_gather",
    "app_publish_many",
    "aio_pika_gather_all",
    "app_publish_many_all",
)
LABELS = {
    "faststream": "FastStream, logger off, no telemetry",
    "faststream_otel": "FastStream, telemetry middleware + default logging",
    "taskiq": "taskiq + taskiq-aio-pika, OpenTelemetry middleware",
    "dramatiq": "Dramatiq RabbitmqBroker, defaults (no tracing)",
    "rabbitflow": "rabbitflow, everything on",
    "rabbitflow_untraced": "rabbitflow, tracing off",
    "rabbitflow_uvloop": "rabbitflow, everything on, uvloop",
    "rabbitflow_sampled": "rabbitflow, everything on, 10 % sampled",
    "rabbitflow_full": "rabbitflow, everything on + middleware, idempotency, timeout, breaker",
    "aio_pika_gather": "aio-pika `gather`, 1,000 in flight",
    "app_publish_gather": "`app.publish` `gather`, 1,000 in flight",
    "app_publish_many": "`app.publish_many`, 1,000 per call",
    "aio_pika_gather_all": "aio-pika `gather` of all",
    "app_publish_many_all": "`app.publish_many` of all",
}


def _topology(queue: str, prefetch: int = 1000, full: bool = False) -> str:
    text = f'[defaults]\nqueue_type = "classic"\nprefetch = {prefetch}\n\n[queues."{queue}"]\n'
    # Every per-delivery option that costs something on the hot path: a handler timeout,
    # in-process retries, a circuit breaker, the idempotency guard.
    return text + FULL_OPTIONS if full else text


FULL_OPTIONS = (
    'timeout = "30s"\nimmediate_retries = 1\nidempotent = true\n'
    'circuit_breaker = { failure_ratio = 0.5, window = "30s", min_calls = 20 }\n'
)


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


async def _publish(
    url: str,
    queue: str,
    count: int,
    window: int = 2000,
    padding: int = 0,
    message_ids: bool = False,
) -> None:
    """Fill ``queue`` with ``count`` JSON orders, persistent, confirmed (``app.batch()``:
    the quickest way to fill a queue, so the run spends its time on the measured cases)."""
    from rabbitflow import App
    from rabbitflow._tracing import Tracing, set_tracing

    set_tracing(Tracing(None))
    async with App(url=url) as app:
        for start in range(0, count, window):
            async with app.batch() as batch:
                for i in range(start, min(start + window, count)):
                    body = BODY.format(i=i, c=f"{i % 7}{'x' * padding}", t=0).encode()
                    message_id = f"{queue}-{i}" if message_ids else None
                    batch.publish(
                        "", queue, body, content_type="application/json", message_id=message_id
                    )


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
    if case in OWN_FORMAT:
        return queue, "", _peer_extra(case, queue)
    if not case.startswith("rabbitflow"):
        asyncio.run(_declare_plain(url, queue))
        return queue, "", []
    path = tmp / f"{queue}.toml"
    path.write_text(_topology(queue, full=case == "rabbitflow_full"))
    asyncio.run(_declare_rabbitflow(url, path))
    return queue, str(path), _generated(queue)


def _peer_extra(case: str, queue: str) -> list[str]:
    from bench.peers import extra_queues

    return extra_queues(case, queue)


def _fill(url: str, case: str, queue: str, count: int) -> None:
    """Publish ``count`` orders to the case's queue (a peer with its own format: its client)."""
    if case not in OWN_FORMAT:
        # The idempotency guard keys on message_id (a message without one runs unguarded).
        asyncio.run(_publish(url, queue, count, message_ids=case == "rabbitflow_full"))
        return
    command = [sys.executable, "-m", "bench.peers", "prepare", case, url, queue, str(count)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600, capture_output=True)


def _generated(queue: str) -> list[str]:
    return [f"{queue}.dlq", *(f"{queue}.retry.{d}" for d in ("1s", "10s", "1m"))]


def consume_round(
    url: str, count: int, tmp: Path, cases: tuple[str, ...] = CONSUME_CASES
) -> dict[str, dict[str, Any]]:
    results = {}
    for case in cases:
        queue, topology, extra = _fresh_queue(url, f"bench.{case}", tmp, case)
        _fill(url, case, queue, count)
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


def _orders(start: int, stop: int) -> list[Any]:
    from bench.consumers import Order

    return [Order(order_id=i, **BODY_FIELDS) for i in range(start, stop)]  # type: ignore[arg-type]


async def _publish_rate_raw(url: str, queue: str, count: int, window: int) -> float:
    """A good hand-written aio-pika publisher: the same pydantic order, persistent,
    mandatory, confirms collected with ``asyncio.gather`` ``window`` at a time."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = channel.default_exchange
    started = time.perf_counter()
    for start in range(0, count, window):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        order.model_dump_json().encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                    mandatory=True,
                )
                for order in _orders(start, min(start + window, count))
            )
        )
    elapsed = time.perf_counter() - started
    await connection.close()
    return count / elapsed


async def _publish_rate_app(
    url: str, queue: str, count: int, window: int, tmp: Path, many: bool
) -> float:
    from rabbitflow import App
    from rabbitflow._tracing import Tracing, set_tracing

    set_tracing(Tracing(None))
    path = tmp / "publish.toml"
    path.write_text(_topology(queue))
    app = App(topology=path, url=url)
    await app.publish("", queue, {"warm": 0})  # connect
    started = time.perf_counter()
    for start in range(0, count, window):
        orders = _orders(start, min(start + window, count))
        if many:
            await app.publish_many("", queue, orders)
        else:
            await asyncio.gather(*(app.publish("", queue, order) for order in orders))
    elapsed = time.perf_counter() - started
    await app.close()
    return count / elapsed


def _publish_case(url: str, case: str, queue: str, count: int, tmp: Path) -> float:
    window = count if case.endswith("_all") else 1000
    if case.startswith("aio_pika"):
        return asyncio.run(_publish_rate_raw(url, queue, count, window))
    many = case.startswith("app_publish_many")
    return asyncio.run(_publish_rate_app(url, queue, count, window, tmp, many))


def publish_round(url: str, count: int, tmp: Path) -> dict[str, float]:
    results = {}
    for case in PUBLISH_CASES:
        queue = f"bench.{case}.{uuid.uuid4().hex[:6]}"
        asyncio.run(_declare_plain(url, queue))
        try:
            results[case] = _publish_case(url, case, queue, count, tmp)
        finally:
            asyncio.run(_delete(url, [queue]))
        print(f"  publish {case:22} {results[case]:9.0f} msg/s", flush=True)
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
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
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
        samples = asyncio.run(_drain_samples(url, queue, process.pid, timeout=300))
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        marks = [json.loads(p.read_text()) for p in stats.iterdir()]
        first = min(m["first"] for m in marks if m["count"])
        last = max(m["last"] for m in marks if m["count"])
        handled = sum(m["count"] for m in marks)
        results[f"workers_{workers}"] = handled / (last - first)
        results[f"cpu_{workers}"] = procstat.steady(samples, count) or {}
        asyncio.run(_delete(url, [queue, *_generated(queue)]))
        cpu = results[f"cpu_{workers}"]
        print(
            f"  --workers {workers:<12} {results[f'workers_{workers}']:9.0f} msg/s "
            f"({handled} handled); cores: workers {cpu.get('workers_cores', 0):.2f}, "
            f"broker {cpu.get('broker_cores', 0):.2f}, machine {cpu.get('machine_cores', 0):.2f}",
            flush=True,
        )
    return results


async def _drain_samples(url: str, queue: str, root: int, timeout: float) -> list[procstat.Sample]:
    """Sample the CPU of the broker, the workers and the machine until ``queue`` is empty."""
    beams = procstat.beam_pids()
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    samples = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        declared = await channel.declare_queue(queue, passive=True)
        ready = declared.declaration_result.message_count or 0
        samples.append(procstat.sample(time.monotonic(), ready, beams, root))
        if ready == 0:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)  # the last acks
    await connection.close()
    return samples


def _spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of one figure over the rounds."""
    if not values:
        return {"median": 0.0, "min": 0.0, "max": 0.0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratios(rounds: list[dict[str, Any]], section: str, case: str, base: str) -> dict[str, float]:
    """``case`` / ``base`` in each round (both measured in the same round), spread."""
    values = []
    for r in rounds:
        a, b = r[section][case], r[section][base]
        a, b = (a["rate"], b["rate"]) if isinstance(a, dict) else (a, b)
        if b:
            values.append(a / b)
    return _spread(values)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "consume" in rounds[0]:
        for case in rounds[0]["consume"]:
            runs = [r["consume"][case] for r in rounds]
            summary[case] = {
                "rate": _spread([x["rate"] for x in runs]),
                "ratio": _ratios(rounds, "consume", case, "aio_pika"),
                "cpu_us_per_msg": _spread([x["cpu_us_per_msg"] for x in runs]),
                "max_rss_mib": max(x["max_rss_mib"] for x in runs),
            }
        summary["peers"] = {
            peer: _ratios(rounds, "consume", "rabbitflow", peer)
            for peer in ("faststream", "faststream_otel", "taskiq", "dramatiq")
            if {peer, "rabbitflow"} <= rounds[0]["consume"].keys()
        }
    if "publish" in rounds[0]:
        for case in PUBLISH_CASES:
            base = "aio_pika_gather_all" if case.endswith("_all") else "aio_pika_gather"
            summary[case] = {
                "rate": _spread([r["publish"][case] for r in rounds]),
                "ratio": _ratios(rounds, "publish", case, base),
            }
    if "latency" in rounds[0]:
        for case in rounds[0]["latency"]:
            summary[f"latency_{case}"] = {
                q: _spread([r["latency"][case][q] for r in rounds]) for q in ("p50_ms", "p99_ms")
            }
    if "workers" in rounds[0]:
        for workers in (1, 2):
            cpu = [r["workers"][f"cpu_{workers}"] for r in rounds]
            summary[f"workers_{workers}"] = {
                "rate": _spread([r["workers"][f"workers_{workers}"] for r in rounds]),
                "ratio": _ratios(rounds, "workers", f"workers_{workers}", "workers_1"),
                "cpu": {
                    key: statistics.median([c[key] for c in cpu if key in c])
                    for key in cpu[0]
                    if all(key in c for c in cpu)
                },
            }
    return summary


def _figure(spread: dict[str, float], unit: str = "", digits: int = 0) -> str:
    m, lo, hi = (f"{spread[k]:,.{digits}f}{unit}" for k in ("median", "min", "max"))
    return f"{m} ({lo}–{hi})"


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| case | msg/s, median (min–max) | ratio, median (min–max) | CPU µs/msg | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    if "aio_pika" in summary:
        for case in (c for c in CONSUME_CASES if c in summary):
            row = summary[case]
            lines.append(
                f"| consume {LABELS.get(case, case)} | {_figure(row['rate'])} | "
                f"{_figure(row['ratio'], '×', 2)} of aio-pika | "
                f"{row['cpu_us_per_msg']['median']:.1f} | {row['max_rss_mib']:.0f} |"
            )
    if "aio_pika_gather" in summary:
        for case in PUBLISH_CASES:
            row = summary[case]
            base = "aio-pika `gather` of all" if case.endswith("_all") else "aio-pika `gather`"
            lines.append(
                f"| publish {LABELS[case]} | {_figure(row['rate'])} | "
                f"{_figure(row['ratio'], '×', 2)} of {base} | | |"
            )
    if "workers_1" in summary:
        for workers in (1, 2):
            row = summary[f"workers_{workers}"]
            lines.append(
                f"| `rabbitflow run --workers {workers}` | {_figure(row['rate'])} | "
                f"{_figure(row['ratio'], '×', 2)} of 1 worker | | |"
            )
    for key, row in summary.items():
        if key.startswith("latency_"):
            lines.append(
                f"| latency {key.removeprefix('latency_')} at 2,000 msg/s | "
                f"p50 {_figure(row['p50_ms'], ' ms', 2)} | p99 {_figure(row['p99_ms'], ' ms', 2)} "
                "| | |"
            )
    lines.append("")
    if "peers" in summary:
        for peer, spread in summary["peers"].items():
            lines.append(f"rabbitflow everything on / {LABELS[peer]}: {_figure(spread, '×', 2)}")
    if "workers_1" in summary:
        lines += ["", *scaling(summary)]
    if "memory" in summary:
        memory = summary["memory"]
        lines.append(
            f"RSS draining 5,000 × 64 KiB (prefetch 32): {memory['rss_first_mib']:.0f} MiB at the "
            f"first message, peak {memory['max_rss_mib']:.0f} MiB, growth "
            f"{memory['rss_growth_mib']:.1f} MiB"
        )
    return "\n".join(lines)


def scaling(summary: dict[str, Any]) -> list[str]:
    """Where the CPU went while the workers drained, and what more cores would give.

    The model: every message costs the workers ``w`` and the broker ``b`` CPU µs (both
    measured with two workers, so with their contention); ``n`` workers on ``c`` cores
    handle at most ``min(n / w, c / (w + b))`` messages per second, until the one queue's
    process in the broker (one Erlang process per classic queue: at most one core) is
    the limit, which this machine cannot show."""
    lines = [
        "| workers | msg/s (drain, 90 %→10 %) | workers' cores | broker's cores "
        "| other processes' cores | machine's cores | workers µs/msg | broker µs/msg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workers in (1, 2):
        cpu = summary[f"workers_{workers}"]["cpu"]
        if not cpu:
            continue
        lines.append(
            f"| {workers} | {cpu['rate']:,.0f} | {cpu['workers_cores']:.2f} | "
            f"{cpu.get('broker_cores', float('nan')):.2f} | "
            f"{cpu.get('other_cores', float('nan')):.2f} | {cpu['machine_cores']:.2f} | "
            f"{cpu['workers_us_per_msg']:.1f} | {cpu.get('broker_us_per_msg', float('nan')):.1f} |"
        )
    cpu = summary["workers_2"]["cpu"]
    if "broker_us_per_msg" not in cpu:
        return [*lines, "", "The broker's CPU was not visible (another PID namespace)."]
    w, b = cpu["workers_us_per_msg"], cpu["broker_us_per_msg"]
    lines += [
        "",
        f"Model (w = {w:.0f} µs per message in the workers, b = {b:.0f} µs in the broker): "
        "n workers on c cores ≤ min(n / w, c / (w + b)) msg/s",
        "",
        "| cores | workers | predicted msg/s | bound by |",
        "|---:|---:|---:|---|",
    ]
    for cores, workers in ((2, 1), (2, 2), (4, 2), (4, 3), (8, 4), (8, 6)):
        alone, shared = workers / w * 1e6, cores / (w + b) * 1e6
        bound = "the workers" if alone < shared else "the cores (broker + workers)"
        lines.append(f"| {cores} | {workers} | {min(alone, shared):,.0f} | {bound} |")
    return lines


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


def environment(url: str) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "cpu": _cpu_model(),
        "load_average": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "python": platform.python_version(),
        "rabbitmq": asyncio.run(_broker_version(url)),
        **{
            name: version(name)
            for name in (
                "rabbitflow",
                "aio-pika",
                "aiormq",
                "pydantic",
                "opentelemetry-sdk",
                "faststream",
                "taskiq",
                "taskiq-aio-pika",
                "dramatiq",
                "pika",
                "uvloop",
            )
        },
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def _broker_version(url: str) -> str:
    connection = await aio_pika.connect(url)
    properties = connection.transport.connection.server_properties
    await connection.close()
    return str(properties.get("version", "unknown"))


def describe(env: dict[str, Any], args: argparse.Namespace) -> str:
    peers = ", ".join(
        f"{name} {env[name]}" for name in ("faststream", "taskiq", "taskiq-aio-pika", "dramatiq")
    )
    return (
        f"{env['date']}, {env['machine']}, {env['cpu']}, load average {env['load_average']} "
        f"(at the end); Python {env['python']}, RabbitMQ {env['rabbitmq']}; rabbitflow "
        f"{env['rabbitflow']}, aio-pika {env['aio-pika']}, aiormq {env['aiormq']}, pydantic "
        f"{env['pydantic']}, opentelemetry-sdk {env['opentelemetry-sdk']}; {peers}. "
        f"{args.rounds} rounds; sections {args.only}; {args.messages:,} messages per consume "
        f"case, {args.publish_messages:,} per publish case, {args.workers_messages:,} per "
        "workers case."
    )


SECTIONS = ("consume", "publish", "latency", "workers", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("RABBITFLOW_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--publish-messages", type=int, default=10_000)
    parser.add_argument("--workers-messages", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=4.0)
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--cases",
        default=",".join(CONSUME_CASES),
        help="comma-separated consume cases (default: all; aio_pika is the baseline)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    cases = tuple(args.cases.split(","))
    started = time.monotonic()
    rounds: list[dict[str, Any]] = []
    memory: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}", flush=True)
            result: dict[str, Any] = {}
            if "consume" in only:
                result["consume"] = consume_round(args.url, args.messages, tmp, cases)
            if "publish" in only:
                result["publish"] = publish_round(args.url, args.publish_messages, tmp)
            if "latency" in only:
                result["latency"] = latency_round(args.url, tmp, 2000, args.latency_seconds)
            if "workers" in only:
                result["workers"] = workers_round(args.url, args.workers_messages, tmp)
            rounds.append(result)
        if "memory" in only:
            print("memory", flush=True)
            memory = memory_run(args.url, tmp)
    summary = summarize(rounds) if rounds and rounds[0] else {}
    if memory is not None:
        summary["memory"] = {
            key: memory[key] for key in ("rss_first_mib", "max_rss_mib", "rss_growth_mib")
        }
    env = environment(args.url)
    report = {
        "environment": env,
        "arguments": vars(args) | {"json": str(args.json)},
        "seconds": time.monotonic() - started,
        "summary": summary,
        "rounds": rounds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print()
    print(describe(env, args))
    print()
    print(table(summary))
    print(f"\nJSON: {args.json}; {report['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
