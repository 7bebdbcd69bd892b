"""What the API accepts and answers, the message it queues and the job's result."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ReportRequest(BaseModel):
    """``POST /jobs``, and the message on ``jobs.reports``: which report to build."""

    report: Literal["sales", "inventory"]
    month: str = Field(pattern=r"^\d{4}-\d{2}$", examples=["2026-10"])


class Report(BaseModel):
    """The job's result: what ``GET /jobs/{id}`` shows once it ``succeeded``."""

    rows: int
    url: str


class Accepted(BaseModel):
    """``POST /jobs`` (202): the job's id; ``Location`` says where to ask for its status."""

    job_id: str
    state: Literal["queued"] = "queued"
