"""The consumer: builds the report each tick asks for.

Run it from the repository root with ``rabbitflow run examples.periodic.app:app``; feed it with
``python -m examples.periodic.publisher --every 60``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import structlog
from pydantic import BaseModel

from rabbitflow import App, Message

app = App(topology=Path(__file__).with_name("topology.toml"), name="reports")
log = structlog.get_logger("reports")


class ReportRequested(BaseModel):
    report: str
    slot: int  # which period this tick stands for: one report per slot
    scheduled_at: datetime


# Slots already built; a real service keeps them in its database (a unique key on the slot).
built: dict[str, ReportRequested] = {}


@app.consumer("reports.requested")
def build_report(request: ReportRequested, message: Message) -> None:
    """A sync handler: building the report is blocking work, run in a thread pool."""
    key = f"{request.report}-{request.slot}"
    if key in built:  # a redelivery, or a second publisher running by mistake
        log.info("report already built", report=request.report, slot=request.slot)
        return
    built[key] = request
    log.info("report built", report=request.report, slot=request.slot)
