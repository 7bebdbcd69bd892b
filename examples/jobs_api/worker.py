"""The consumer: builds reports; rabbitflow records each job's status.

rabbitflow run examples.jobs_api.worker:app
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from examples.jobs_api.config import TOPOLOGY, job_store
from examples.jobs_api.models import Report, ReportRequest
from rabbitflow import App, Message

app = App(topology=TOPOLOGY, name="jobs-worker", jobs=job_store())


def render_report(request: ReportRequest, job_id: str) -> Report:
    """The slow, blocking part (a query, a PDF): stands in for the real work."""
    time.sleep(0.01)
    digest = hashlib.sha256(f"{request.report}/{request.month}".encode()).hexdigest()
    return Report(rows=int(digest[:4], 16) % 1000, url=f"/files/{job_id}.csv")


@app.consumer("jobs.reports", track=True)
async def run_report(request: ReportRequest, message: Message) -> Report:
    """``track=True``: the worker records ``running``, ``retrying``, then ``succeeded`` with
    this return value as the result, or ``failed`` once the message is dead-lettered."""
    assert message.message_id is not None  # the job id: app.enqueue() sets it
    await message.progress(0.1, "rendering")
    return await asyncio.to_thread(render_report, request, message.message_id)
