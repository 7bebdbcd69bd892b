"""The consumer: runs report jobs and records their status for the API.

rabbitflow run examples.jobs_api.worker:app
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path
from typing import Any

import structlog

from examples.jobs_api.models import ReportJob, Status
from examples.jobs_api.store import store
from rabbitflow import App, Message

app = App(topology=Path(__file__).with_name("topology.toml"), name="jobs")
log = structlog.get_logger("jobs")


def render_report(job: ReportJob) -> dict[str, Any]:
    """The slow part (a query, a PDF): stands in for the real work."""
    time.sleep(0.01)
    digest = hashlib.sha256(f"{job.report}/{job.month}".encode()).hexdigest()
    return {"rows": int(digest[:4], 16) % 1000, "url": f"/files/{job.job_id}.csv"}


@app.consumer("jobs.reports")
def run_report(job: ReportJob, message: Message) -> None:
    """A sync handler (SQLite and the rendering block): it runs in a worker thread."""
    current = store.get(job.job_id)
    if current is not None and current.status == "succeeded":
        return  # a duplicate delivery: the job is done, do not run it again
    store.update(job.job_id, "running", attempt=message.attempt)
    try:
        result = render_report(job)
    except Exception as exc:
        # Raising hands the message to rabbitflow: retried later (5s, 1m), then Q.dlq.
        # max_attempts is 3 in topology.toml; the last failure is final for the user.
        status: Status = "failed" if message.attempt >= max_attempts() else "retrying"
        store.update(job.job_id, status, error=f"{type(exc).__name__}: {exc}")
        raise
    store.update(job.job_id, "succeeded", result=result)
    log.info("report built", job_id=job.job_id, report=job.report, month=job.month)


@functools.cache
def max_attempts() -> int:
    return app.load_topology().queues["jobs.reports"].retry.max_attempts
