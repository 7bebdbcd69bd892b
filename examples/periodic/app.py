"""Scheduled report requests and the consumer that builds the reports.

Run it from the repository root with ``rabbitflow run examples.periodic.app:app``: the same
process publishes a report request every minute (``@app.every``) and a nightly clean-up at
03:00 Paris time (``@app.cron``), and consumes the requests. Start it three times, or with
``--workers 3``: each tick is still published once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import BaseModel

from rabbitflow import App, Message

app = App(topology=Path(__file__).with_name("topology.toml"), name="reports")
log = structlog.get_logger("reports")


class ReportRequested(BaseModel):
    report: str
    requested_at: datetime


@app.every("1m", exchange="reports", routing_key="report.requested")
def request_sales_report() -> ReportRequested:
    """Once a minute, for the whole deployment: the scheduler publishes what this returns."""
    return ReportRequested(report="sales", requested_at=datetime.now(UTC))


@app.cron("0 3 * * *", exchange="reports", routing_key="report.requested", timezone="Europe/Paris")
def request_cleanup() -> ReportRequested | None:
    """At 03:00 in Paris, summer and winter; returning None skips a tick."""
    if datetime.now(UTC).day == 1:
        return None  # the monthly job does its own clean-up
    return ReportRequested(report="cleanup", requested_at=datetime.now(UTC))


# Ticks already built; a real service keeps them in its database (a unique key), or uses
# @app.consumer(..., idempotent=True) with a store.
built: dict[str, ReportRequested] = {}


@app.consumer("reports.requested")
def build_report(request: ReportRequested, message: Message) -> None:
    """A sync handler: building the report is blocking work, run in a thread pool.

    A tick's message_id is the schedule name and the tick's time, the same whichever
    process published it; a redelivery (or, rarely, a tick republished by a process that
    took over) has the same id and is built once."""
    key = message.message_id or request.report
    if key in built:
        log.info("report already built", message_id=key)
        return
    built[key] = request
    log.info("report built", report=request.report, message_id=key)
