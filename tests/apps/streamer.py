"""A stream consumer for ``tests/test_streams_broker.py``: records ``event <message_id> <attempt>``
for each handler run, and fails for good on a body ``{"fail": true}``."""

from __future__ import annotations

from pathlib import Path

from rabbitflow import App, Message
from tests.apps.recording import record

app = App(topology=Path(__file__).with_name("stream.toml"), name="streamer")


@app.consumer("events")
async def handle(payload: dict[str, bool], message: Message) -> None:
    record("event", message.message_id, message.attempt)
    if payload.get("fail"):
        raise ValueError("this event cannot be handled")
