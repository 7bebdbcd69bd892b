"""CPU per message of rabbitflow's own delivery path, in process: no broker, no network.

``TestApp`` (the in-memory broker) runs the real dispatcher, policy and settler with every
per-delivery option on (the ``rabbitflow_full`` consume case of :mod:`bench.run`: a
middleware, an idempotent consumer, a timeout, in-process retries, a circuit breaker), and
the process's CPU time is read around the drain. The memory broker's own share is the same
from one version of rabbitflow to the next, so two runs compare the delivery path's cost;
where the broker and the client library share the machine's cores with other work, this is
steadier than the consume rates of :mod:`bench.run`.

    .venv/bin/python -m bench.inprocess            # prints µs of CPU per message
    .venv/bin/python -m bench.inprocess --runs 20  # the minimum over more runs
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.consumers import Order
from rabbitflow import App, Message
from rabbitflow.idempotency import MemoryStore
from rabbitflow.testing import TestApp
from rabbitflow.topology import parse_topology
from rabbitflow.types import CallNext

# The memory broker holds a few thousand messages in a queue at most: one drain per batch.
BATCH = 2500
TOPOLOGY = """
[defaults]
queue_type = "classic"
prefetch = 1000

[queues.q]
timeout = "30s"
immediate_retries = 1
idempotent = true
circuit_breaker = { failure_ratio = 0.5, window = "30s", min_calls = 20 }
"""


async def drain_once(batch: int) -> float:
    """CPU seconds to deliver, run and settle ``batch`` messages."""
    app = App(idempotency=MemoryStore())

    @app.use
    async def passthrough(message: Message, call_next: CallNext) -> Any:
        return await call_next(message)

    handled = 0

    @app.consumer("q")
    async def handle(order: Order) -> None:
        nonlocal handled
        handled += 1

    order = {"order_id": 1, "customer": "customer-1", "amount": 12.5, "sent_at": 0.0}
    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        for i in range(batch):
            await t.publish("", "q", order, message_id=f"m-{i}")
        started = time.process_time()
        await t.drain()
        spent = time.process_time() - started
    assert handled == batch, handled
    return spent


async def measure(runs: int, batches: int) -> list[float]:
    await drain_once(BATCH)  # warm-up: imports, pydantic, the first TestApp
    results = []
    for _ in range(runs):
        spent = sum([await drain_once(BATCH) for _ in range(batches)])
        results.append(spent / (batches * BATCH) * 1e6)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs; the minimum is reported")
    parser.add_argument("--batches", type=int, default=4, help=f"batches of {BATCH} per run")
    args = parser.parse_args()
    results = asyncio.run(measure(args.runs, args.batches))
    print(
        f"{min(results):.1f} µs CPU per message (min of {args.runs}; "
        f"all: {', '.join(f'{r:.1f}' for r in results)})"
    )


if __name__ == "__main__":
    main()
