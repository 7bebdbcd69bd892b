"""The HTTP side: ``POST /jobs`` enqueues a job and answers 202 with its id at once;
``GET /jobs/{job_id}`` (``rabbitflow.asgi.jobs_router``) tells where it stands.

    uvicorn examples.jobs_api.api:api
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Response

from examples.jobs_api.config import TOPOLOGY, job_store
from examples.jobs_api.models import Accepted, ReportRequest
from rabbitflow import App, PublishError
from rabbitflow.asgi import jobs_router, lifespan

# The API's own App: no consumers (the handlers run in `rabbitflow run`), the same topology
# and job store as the worker's.
store = job_store()
app = App(topology=TOPOLOGY, name="jobs-api", jobs=store)

api = FastAPI(title="Report jobs", lifespan=lifespan(app))
api.include_router(jobs_router(app), prefix="/jobs")


@api.post("/jobs", status_code=202)
async def create_job(request: ReportRequest, response: Response) -> Accepted:
    try:
        # Returns once the broker has confirmed the message, and the job is `queued`.
        job = await app.enqueue("jobs", "report", request)
    except PublishError:
        # Every way the message can fail to reach the broker (down or unreachable, login
        # refused, nacked, nothing bound): nothing was queued and no job was recorded.
        raise HTTPException(
            503, "the job queue is unavailable; try again", headers={"Retry-After": "5"}
        ) from None
    response.headers["Location"] = f"/jobs/{job.id}"
    return Accepted(job_id=job.id)
