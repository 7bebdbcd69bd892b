"""One consumer on the queue ``work``, async (``async_app``) or sync (``sync_app``).

Each run records ``start <message_id>`` and, after sleeping ``$RF_SLEEP`` seconds,
``done <message_id> <redelivered>``. The topology comes from ``--topology`` (tests write one
with the settings they need; ``work.toml`` is the default).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from rabbitflow import App, Message
from tests.apps.recording import record

TOPOLOGY = Path(__file__).with_name("work.toml")


def _sleep() -> float:
    return float(os.environ.get("RF_SLEEP", "0"))


async_app = App(topology=TOPOLOGY, name="work-async")
sync_app = App(topology=TOPOLOGY, name="work-sync")


@async_app.consumer("work")
async def handle_async(message: Message) -> None:
    record("start", message.message_id)
    await asyncio.sleep(_sleep())
    record("done", message.message_id, message.redelivered)


@sync_app.consumer("work")
def handle_sync(message: Message) -> None:
    record("start", message.message_id)
    time.sleep(_sleep())
    record("done", message.message_id, message.redelivered)


app = async_app
