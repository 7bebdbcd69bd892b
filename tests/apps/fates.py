"""One consumer on the queue ``work`` (``work.toml``: one 1 s retry tier, 2 attempts) whose
messages say how they end: ``{"fate": "ok"}`` is acked, ``"retry"`` fails every attempt (a
retry, then the DLQ), ``"reject"`` goes to the DLQ at once. ``ms`` is the handler's time."""

from __future__ import annotations

import asyncio
from typing import Any

from rabbitflow import App, Reject
from tests.apps.work import TOPOLOGY

app = App(topology=TOPOLOGY, name="fates")


@app.consumer("work")
async def handle(body: dict[str, Any]) -> None:
    await asyncio.sleep(body.get("ms", 0) / 1000)
    if body["fate"] == "retry":
        raise RuntimeError("always fails")
    if body["fate"] == "reject":
        raise Reject("rejected")
