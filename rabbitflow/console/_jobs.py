"""The console's job page: one job by id (``/jobs?id=...``), from the job store that
``rabbitflow console --jobs URL`` names (docs/jobs.md).

The page shows the job's state, attempt, times, progress and note, its last error, its
result, and for a failed job the link to its dead letter (``/dlq/QUEUE/message?key=id:ID``).
Nothing here writes: a failed job is queued again by replaying its dead letter.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from rabbitflow.console._state import Console
from rabbitflow.job import JobState, JobStatus

# The longest result shown on the page, as indented JSON (the rest is cut, and says so).
RESULT_SHOWN = 64 * 1024


def job_routes(console: Console) -> list[BaseRoute]:
    """``/jobs``: a form for an id, or the job it names (404 when unknown)."""

    async def endpoint(request: Request) -> Response:
        return await job_page(console, request)

    # The id is in the query: a message_id may hold any character, "/" included.
    return [Route("/jobs", endpoint)]


async def job_page(console: Console, request: Request) -> Response:
    book = console.settings.jobs
    if book is None:
        raise HTTPException(404, "no job store: start the console with --jobs URL")
    job_id = request.query_params.get("id", "").strip()
    if not job_id:
        return console.templates.TemplateResponse(request, "job.html", {"job": None, "id": ""})
    status = await book.get(job_id)
    if status is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or expired after the jobs ttl)")
    context: dict[str, Any] = {
        "job": status,
        "id": job_id,
        "percent": None if status.progress is None else round(status.progress * 100),
        "result": _result(status),
        "dead_letter": _dead_letter(console, status),
    }
    return console.templates.TemplateResponse(request, "job.html", context)


def _result(status: JobStatus) -> str | None:
    if status.state is not JobState.SUCCEEDED:
        return None
    text = json.dumps(status.result, indent=2, ensure_ascii=False)
    if len(text) > RESULT_SHOWN:
        return text[:RESULT_SHOWN] + f"\n… ({len(text) - RESULT_SHOWN} more characters)"
    return text


def _dead_letter(console: Console, status: JobStatus) -> str | None:
    """The link to the job's dead letter: a failed job of a queue with a DLQ."""
    if status.state is not JobState.FAILED or status.queue not in console.dead_lettered():
        return None
    return f"/dlq/{status.queue}/message?key=id:{status.id}"
