"""The HTTP side: ``POST /jobs`` enqueues a job and answers 202 with its id at once;
``GET /jobs/{job_id}`` tells where it stands.

    uvicorn examples.jobs_api.api:api
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException, Response

from examples.jobs_api.models import Job, ReportJob, ReportRequest
from examples.jobs_api.store import store
from examples.jobs_api.worker import app
from rabbitflow import PublishError


@contextlib.asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with app:  # app.publish opens a connection on first use; closed at shutdown
        yield


api = FastAPI(title="Report jobs", lifespan=lifespan)


@api.post("/jobs", status_code=202)
async def create_job(request: ReportRequest, response: Response) -> Job:
    job_id = uuid.uuid4().hex
    # The row first: the worker may pick the job up before this handler returns.
    job = await asyncio.to_thread(store.create, job_id)
    try:
        # Returns once the broker has confirmed the message: the job cannot get lost now.
        # message_id = job id, so a redelivered message is recognisable as the same job.
        await app.publish(
            "jobs", "report", ReportJob(job_id=job_id, **request.model_dump()), message_id=job_id
        )
    except PublishError as exc:
        # Every way the message can fail to reach the broker: down or unreachable
        # (PublishUnreachableError), refused, nacked, nothing bound (UnroutableError).
        await asyncio.to_thread(store.update, job_id, "failed", error=f"not enqueued: {exc}")
        raise HTTPException(
            503, "the job queue is unavailable; try again", headers={"Retry-After": "5"}
        ) from None
    response.headers["Location"] = f"/jobs/{job_id}"
    return job


@api.get("/jobs/{job_id}")
async def get_job(job_id: str) -> Job:
    job = await asyncio.to_thread(store.get, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job
