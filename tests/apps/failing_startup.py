"""An app whose start-up hook fails (a database that cannot be reached, say)."""

from __future__ import annotations

from pathlib import Path

from rabbitflow import App

app = App(topology=Path(__file__).with_name("work.toml"))


@app.on_startup
async def connect_database() -> None:
    raise RuntimeError("database unreachable")


@app.consumer("work")
async def handle(body: bytes) -> None: ...
