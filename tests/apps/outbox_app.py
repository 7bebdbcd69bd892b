"""An app with an outbox, for the relay in subprocesses (``rabbitflow run`` and ``rabbitflow
outbox relay``): the outbox's PostgreSQL, schema, batch size and lease come from
``RF_OUTBOX_DSN``, ``RF_OUTBOX_SCHEMA``, ``RF_OUTBOX_BATCH``, ``RF_OUTBOX_LEASE`` and
``RF_OUTBOX_PUBLISH_TIMEOUT``."""

from __future__ import annotations

import os
from pathlib import Path

from rabbitflow import App
from rabbitflow.outbox import PostgresOutbox

outbox = PostgresOutbox(
    os.environ.get("RF_OUTBOX_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    schema=os.environ.get("RF_OUTBOX_SCHEMA") or None,
    batch_size=int(os.environ.get("RF_OUTBOX_BATCH", "500")),
    lease=os.environ.get("RF_OUTBOX_LEASE", "30s"),
    publish_timeout=os.environ.get("RF_OUTBOX_PUBLISH_TIMEOUT", "20s"),
)
app = App(topology=Path(__file__).with_name("work.toml"), name="outbox-app", outbox=outbox)


@app.consumer("work")
async def work(body: bytes) -> None:
    """The queue of work.toml; the tests only watch the relay."""
