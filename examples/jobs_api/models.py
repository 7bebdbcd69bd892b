"""What the API accepts and answers, and the message it puts on the queue."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "running", "retrying", "succeeded", "failed"]


class ReportRequest(BaseModel):
    """``POST /jobs``: which report to build."""

    report: Literal["sales", "inventory"]
    month: str = Field(pattern=r"^\d{4}-\d{2}$", examples=["2026-10"])


class ReportJob(ReportRequest):
    """The message on ``jobs.reports``: the request and the job it belongs to."""

    job_id: str


class Job(BaseModel):
    """``GET /jobs/{job_id}``: where the job stands."""

    job_id: str
    status: Status
    attempt: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    updated_at: datetime
