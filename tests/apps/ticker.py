"""A schedule and the consumer of its ticks, for ``tests/test_schedule_broker.py``.

Every process publishes nothing on its own: only the one holding the lease does. The consumer
records each tick it receives (``tick <message_id> <scheduled-at> <received-at> <redelivered>``);
the scheduled function records which process ran it (``produced <pid> <time>``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rabbitflow import App, Message
from tests.apps.recording import record

app = App(topology=Path(__file__).with_name("work.toml"), name="ticker")


@app.every("1s", exchange="jobs", routing_key="work", name="tests.ticker")
def tick() -> dict[str, float]:
    record("produced", os.getpid(), time.time())
    return {"at": time.time()}


@app.consumer("work")
async def work(payload: dict[str, float], message: Message) -> None:
    scheduled = message.headers["rabbitflow-scheduled-at"]
    record("tick", message.message_id, scheduled, time.time(), int(message.redelivered))
