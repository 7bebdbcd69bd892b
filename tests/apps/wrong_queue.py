"""A handler for a queue that ``work.toml`` does not declare (a typo of ``work``)."""

from __future__ import annotations

from pathlib import Path

from rabbitflow import App

app = App(topology=Path(__file__).with_name("work.toml"))


@app.consumer("wrok")
async def handle(body: bytes) -> None: ...
