"""A worker that dies on one poison message: run with ``rabbitflow run tests.crashapp:app``.

The queue is ``crashy`` and the topology comes from ``--topology``. A message whose
``message_id`` starts with ``poison`` kills the process with ``os._exit(1)`` (as a segfault or
the OOM killer would: no exception, no ack, no nack); every other message is processed. Each
run is recorded in ``$RF_RECORD`` as ``crash|done <message_id> <attempt>``.
"""

from __future__ import annotations

import os

from rabbitflow import App, Message
from tests.support.records import record

app = App(name="crashapp")


@app.consumer("crashy")
async def handle(message: Message) -> None:
    if (message.message_id or "").startswith("poison"):
        record("crash", message.message_id, message.attempt)
        os._exit(1)
    record("done", message.message_id, message.attempt)
