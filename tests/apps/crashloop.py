"""A worker whose handler kills its process on every run: `tests.apps.crashloop:app`.

The queue is ``crashy`` (topology from ``--topology``). Every message kills the process with
``os._exit(1)`` (as a segfault or the OOM killer would: no exception, no ack, no nack), after
recording ``crash <message_id> <attempt> <x-delivery-count> <x-acquired-count>`` in
``$RF_RECORD`` (``-`` for an absent header).
"""

from __future__ import annotations

import os

from rabbitflow import App, Message
from tests.support.records import record

app = App(name="crashloop")


@app.consumer("crashy")
async def handle(message: Message) -> None:
    headers = message.headers
    counts = [headers.get(name, "-") for name in ("x-delivery-count", "x-acquired-count")]
    record("crash", message.message_id, message.attempt, *counts)
    os._exit(1)
