"""``jobs_router(app)``: ``GET /{job_id}`` answers a job's status for FastAPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbitflow.app import App
from rabbitflow.errors import StoreUnavailableError
from rabbitflow.job import JobStatus

if TYPE_CHECKING:
    from fastapi import APIRouter

#: Seconds a client is asked to wait when the job store does not answer.
RETRY_AFTER = "5"


def jobs_router(app: App, *, tags: list[str] | None = None) -> APIRouter:
    """A FastAPI router whose ``GET /{job_id}`` answers the job's
    :class:`~rabbitflow.job.JobStatus` as JSON::

        api.include_router(jobs_router(app), prefix="/jobs")

    404 when the job is unknown (never enqueued, or expired after ``jobs_ttl``); 503 with
    ``Retry-After`` when the job store does not answer. The app needs ``App(jobs=...)``:
    without it this raises :class:`~rabbitflow.ConfigurationError` at once."""
    from fastapi import APIRouter, HTTPException

    book = app.jobs  # no store: a ConfigurationError now, not a 500 on the first request
    router = APIRouter(tags=list(tags or ["jobs"]))

    @router.get(
        "/{job_id}",
        response_model=JobStatus,
        responses={404: {"description": "unknown job"}, 503: {"description": "store down"}},
    )
    async def job_status(job_id: str) -> JobStatus:
        """The job's state, attempt, progress, result or error."""
        try:
            status = await book.get(job_id)
        except StoreUnavailableError:
            raise HTTPException(
                503, "the job store does not answer; try again", {"Retry-After": RETRY_AFTER}
            ) from None
        if status is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return status

    return router
