"""Jobs: status, result and progress of tracked messages (contract section 12).

``App(jobs=RedisStore(...))`` (or ``PostgresStore``, ``MemoryStore`` of
:mod:`rabbitflow.idempotency`), ``job = await app.enqueue(...)``, ``await app.jobs.get(id)``,
``await job.result(timeout=30)``, ``await job.cancel()``; the worker records the jobs of
consumers with ``track=True`` (or ``track = true`` on the queue). See docs/jobs.md.
"""

from rabbitflow.errors import JobCancelled, JobError, JobFailed, JobResultError, JobTimeout
from rabbitflow.job import Job, JobBook, JobState, JobStatus
from rabbitflow.jobs._book import MAX_RESULT_BYTES, Backend, Book
from rabbitflow.jobs._change import Change

__all__ = [
    "MAX_RESULT_BYTES",
    "Backend",
    "Book",
    "Change",
    "Job",
    "JobBook",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobResultError",
    "JobState",
    "JobStatus",
    "JobTimeout",
]
