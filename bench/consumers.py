"""Benchmark consumers, each run in a process of its own: ``python -m bench.consumers CASE ...``.

Every case consumes N pre-published JSON messages from one queue and prints one JSON line:
wall time from the first delivery to the last handled message, the CPU time the process spent
over that span (getrusage), and its peak RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from typing import Any

from pydantic import BaseModel

PREFETCH = 1000


class Order(BaseModel):
    order_id: int
    customer: str
    amount: float
    sent_at: float = 0.0


class Meter:
    """First/last timestamps and CPU of the measured span."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first = 0.0
        self.cpu_first = 0.0
        self.done = asyncio.Event()
        self.latencies: list[float] = []

    def tick(self, sent_at: float = 0.0) -> None:
        if self.count == 0:
            self.first = time.perf_counter()
            self.cpu_first = _cpu()
            self.rss_first = _status_mib("VmRSS")
        if sent_at:
            self.latencies.append(time.time() - sent_at)
        self.count += 1
        if self.count == self.expected:
            self.last = time.perf_counter()
            self.cpu_last = _cpu()
            self.done.set()

    def report(self) -> dict[str, Any]:
        elapsed = self.last - self.first
        span = max(self.expected - 1, 1)
        result: dict[str, Any] = {
            "messages": self.expected,
            "elapsed": elapsed,
            "rate": span / elapsed if elapsed > 0 else 0.0,
            "cpu_us_per_msg": (self.cpu_last - self.cpu_first) / span * 1e6,
            # VmHWM, not ru_maxrss: after fork+exec Linux carries the parent's peak into
            # ru_maxrss, so every case would report the orchestrator's size.
            "max_rss_mib": _status_mib("VmHWM"),
            "rss_first_mib": self.rss_first,
        }
        if self.latencies:
            ordered = sorted(self.latencies)
            result["p50_ms"] = ordered[len(ordered) // 2] * 1000
            result["p99_ms"] = ordered[int(len(ordered) * 0.99)] * 1000
        return result


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS now, VmHWM peak), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def raw_aio_pika(url: str, queue: str, meter: Meter, pydantic: bool) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    source = await channel.declare_queue(queue, passive=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if pydantic:
            order = Order.model_validate_json(message.body)
            sent_at = order.sent_at
        else:
            sent_at = json.loads(message.body).get("sent_at", 0.0)
        await message.ack()
        meter.tick(sent_at)

    await source.consume(on_message)
    await meter.done.wait()
    await connection.close()


async def faststream(url: str, queue: str, meter: Meter) -> None:
    """FastStream with the logger off and no telemetry: its fastest configuration."""
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=PREFETCH), logger=None)

    @broker.subscriber(RabbitQueue(queue, durable=True))
    async def handle(order: Order) -> None:
        meter.tick(order.sent_at)

    await broker.start()
    await meter.done.wait()
    await broker.stop()


def install_sdk_tracing() -> Any:
    """The OpenTelemetry SDK as a user configures it: a ``TracerProvider`` with a
    ``BatchSpanProcessor``, here with an exporter that drops the spans."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class NoOpExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
    trace.set_tracer_provider(provider)
    return provider


async def rabbitflow(
    url: str, queue: str, topology_path: str, meter: Meter, traced: bool, full: bool = False
) -> None:
    from rabbitflow import App, Message
    from rabbitflow._logging import configure_logging
    from rabbitflow._tracing import Tracing, set_tracing
    from rabbitflow._worker import Worker, WorkerOptions
    from rabbitflow.idempotency import MemoryStore
    from rabbitflow.topology import load_topology
    from rabbitflow.types import CallNext

    configure_logging("json", "info")
    if traced:
        install_sdk_tracing()
        set_tracing(None)  # re-read: the SDK provider installed above is respected
    else:
        set_tracing(Tracing(None))
    app = App(topology=topology_path, idempotency=MemoryStore() if full else None)
    if full:
        # A pass-through middleware, as a user's tenant or timing middleware would be.
        @app.use
        async def passthrough(message: Message, call_next: CallNext) -> Any:
            return await call_next(message)

    @app.consumer(queue)
    async def handle(order: Order) -> None:
        meter.tick(order.sent_at)

    worker = Worker(app, load_topology(topology_path), WorkerOptions(url=url, declare=False))
    task = asyncio.create_task(worker.run())
    await meter.done.wait()
    worker.stop()
    await task


def main() -> None:
    case, url, queue, expected = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    topology = sys.argv[5] if len(sys.argv) > 5 else ""
    loop_name = os.environ.get("BENCH_LOOP", "asyncio")
    from bench import peers

    meter_holder: dict[str, Meter] = {}

    async def run() -> None:
        meter = meter_holder["m"] = Meter(expected)
        if case == "aio_pika":
            await raw_aio_pika(url, queue, meter, pydantic=False)
        elif case == "aio_pika_pydantic":
            await raw_aio_pika(url, queue, meter, pydantic=True)
        elif case == "faststream":
            await faststream(url, queue, meter)
        elif case == "faststream_otel":
            await peers.faststream_telemetry(url, queue, meter)
        elif case == "taskiq":
            await peers.taskiq(url, queue, meter)
        elif case == "dramatiq":
            peers.dramatiq(url, queue, meter)
        elif case == "rabbitflow":
            await rabbitflow(url, queue, topology, meter, traced=True)
        elif case == "rabbitflow_full":
            await rabbitflow(url, queue, topology, meter, traced=True, full=True)
        elif case == "rabbitflow_untraced":
            await rabbitflow(url, queue, topology, meter, traced=False)
        else:
            raise SystemExit(f"unknown case {case}")

    if loop_name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run())
    else:
        asyncio.run(run())
    print(json.dumps(meter_holder["m"].report()), flush=True)


if __name__ == "__main__":
    main()
