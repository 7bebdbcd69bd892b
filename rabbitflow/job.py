"""Jobs as the core knows them (contract section 12): a state, a status, a handle.

``app.enqueue()`` returns a :class:`Job`; ``app.jobs`` is a :class:`JobBook`, whose
implementations (on the stores of section 8) live in :mod:`rabbitflow.jobs`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from rabbitflow.errors import JobCancelled, JobFailed, JobTimeout

if TYPE_CHECKING:
    from rabbitflow._tracking import Tracker


class JobState(enum.StrEnum):
    """Where a job is: ``queued`` → ``running`` → (``retrying`` → ``running``)* →
    ``succeeded`` | ``failed`` | ``cancelled``; a DLQ replay makes a failed job ``queued``."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Succeeded, failed or cancelled (a failed job may still be replayed)."""
        return self in _FINISHED


_FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobStatus(BaseModel):
    """What the store knows of one job.

    ``attempt`` is the attempt running or last run (0 before the first); ``due_at`` when a
    ``retrying`` job's next attempt is due; ``progress`` (0..1) and ``note`` what the handler
    last reported with ``message.progress()``; ``result`` the handler's return value as JSON
    (``succeeded``); ``error`` and ``error_type`` the last failure; ``cancel_requested``
    whether ``job.cancel()`` asked a running job to stop; ``queue`` the queue that ran it;
    ``steps`` the steps of a workflow (empty for a plain job)."""

    model_config = ConfigDict(frozen=True)

    id: str
    state: JobState
    queue: str | None = None
    attempt: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    due_at: datetime | None = None
    progress: float | None = None
    note: str | None = None
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    cancel_requested: bool = False
    steps: list[dict[str, Any]] = Field(default_factory=list)


class JobBook(Protocol):
    """``app.jobs``: job statuses in a store, read by anyone, written by the worker.

    The recording methods never move a job backwards: ``record_queued`` creates a job that
    is not known yet and leaves one the worker already reached alone."""

    ttl_ms: int

    async def get(self, job_id: str) -> JobStatus | None:
        """The job's status; None when unknown or expired."""
        ...

    async def wait(self, job_id: str, timeout: float | None) -> JobStatus | None:
        """The job's status once it is finished (``succeeded``, ``failed``, ``cancelled``),
        waiting for the store's notification (no polling); at ``timeout`` seconds the
        status as it is then (None when unknown)."""
        ...

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel the job: a queued (or retrying) job becomes ``cancelled`` now and is acked
        without running when its message comes; a running one is asked to stop
        (``message.cancelled``). The status after the request; None when unknown."""
        ...

    async def record_queued(self, job_id: str, *, queue: str | None = None) -> None:
        """A job was published: ``queued``, unless the store knows it already."""
        ...

    async def record_replayed(self, job_id: str) -> None:
        """A failed job's message went back to its queue (a DLQ replay): ``queued`` again."""
        ...

    def tracker(self, queue: str) -> Tracker:
        """The worker's recorder for the deliveries of ``queue``."""
        ...

    async def flush(self) -> None:
        """Write what is recorded but not written yet (bounded by the store's timeout)."""
        ...

    async def close(self) -> None:
        """Flush, stop listening, and close what the book opened."""
        ...


class Job:
    """A job by id: its status, its result, its cancellation. ``id`` is the message_id."""

    __slots__ = ("_book", "id")

    def __init__(self, job_id: str, book: JobBook) -> None:
        self.id = job_id
        self._book = book

    async def status(self) -> JobStatus | None:
        """The job's status now; None when unknown or expired."""
        return await self._book.get(self.id)

    async def result(self, timeout: float | None = None) -> Any:
        """The handler's return value (as JSON: a model comes back as a dict) once the job
        succeeded, waiting up to ``timeout`` seconds (None: for ever).

        Raises :class:`~rabbitflow.errors.JobFailed` (the message is in the DLQ),
        :class:`~rabbitflow.errors.JobCancelled`, or :class:`~rabbitflow.errors.JobTimeout`
        (a :class:`~rabbitflow.RequestTimeout`) when it is not finished in time."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        status = await self._book.wait(self.id, timeout)
        if status is None or not status.state.finished:
            state = None if status is None else status.state.value
            raise JobTimeout(self.id, timeout or 0.0, state)
        if status.state is JobState.FAILED:
            raise JobFailed(
                self.id, status.error, error_type=status.error_type, attempt=status.attempt
            )
        if status.state is JobState.CANCELLED:
            raise JobCancelled(self.id)
        return status.result

    async def cancel(self) -> JobStatus | None:
        """Cancel the job (see :meth:`JobBook.cancel`); the status after the request."""
        return await self._book.cancel(self.id)

    def __repr__(self) -> str:
        return f"<Job {self.id!r}>"
