"""The app ``rabbitflow run --workers N`` runs in the benchmark; each worker writes its marks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.consumers import Order
from rabbitflow import App

app = App(name="bench")
marks = {"first": 0.0, "last": 0.0, "count": 0}


@app.consumer(os.environ.get("BENCH_QUEUE", "bench"))
async def handle(order: Order) -> None:
    now = time.time()
    if not marks["count"]:
        marks["first"] = now
    marks["last"] = now
    marks["count"] += 1


@app.on_shutdown
def write_marks() -> None:
    stats = os.environ.get("BENCH_STATS")
    if stats:
        Path(stats, f"{os.getpid()}.json").write_text(json.dumps(marks))
