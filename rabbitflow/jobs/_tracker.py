"""The worker's side of jobs: one :class:`JobTracker` per tracked queue (the core's
:class:`~rabbitflow._tracking.Tracker`).

Nothing here waits for the store: each transition is handed to the book's writer. The only
per-delivery work is reading the message_id, a set lookup (is it cancelled?), one context
variable, and the change records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiormq.abc import DeliveredMessage
from pydantic_core import PydanticSerializationError, to_json

from rabbitflow import _clock as clock
from rabbitflow import _headers as h
from rabbitflow._outcome import Action, Plan
from rabbitflow._tracking import CURRENT, SKIPPED, Invoke
from rabbitflow.errors import JobResultError
from rabbitflow.jobs import _change as c

if TYPE_CHECKING:
    from rabbitflow.jobs._book import Book


class RunningJob:
    """The job a handler runs for: ``message.progress()`` and ``message.cancelled``."""

    __slots__ = ("_attempt", "_book", "job_id")

    def __init__(self, job_id: str, attempt: int, book: Book) -> None:
        self.job_id = job_id
        self._attempt = attempt
        self._book = book

    @property
    def cancelled(self) -> bool:
        return self.job_id in self._book.cancels

    def progress(self, fraction: float, note: str | None) -> None:
        change = c.Change(
            self.job_id, c.PROGRESS, clock.now(), self._attempt, progress=fraction, note=note
        )
        self._book.record(change)


class JobTracker:
    """Records the jobs of ``queue``'s deliveries in ``book``."""

    __slots__ = ("_book", "_running", "queue")

    def __init__(self, queue: str, book: Book) -> None:
        self.queue = queue
        self._book = book
        # The jobs whose handler ran here and whose delivery is not settled yet.
        self._running: set[str] = set()

    def wrap(self, invoke: Invoke) -> Invoke:
        book, queue, running = self._book, self.queue, self._running
        record, limit = book.record, book.max_result_bytes

        async def tracked(delivery: DeliveredMessage, attempt: int) -> Any:
            job_id = delivery.header.properties.message_id
            if not job_id:
                return await invoke(delivery, attempt)
            book.watch_cancels()
            if job_id in book.cancels:
                # Cancelled while queued (or between attempts): acked without running.
                record(c.Change(job_id, c.CANCELLED, clock.now(), attempt, queue))
                return SKIPPED
            record(c.Change(job_id, c.RUNNING, clock.now(), attempt, queue))
            running.add(job_id)
            token = CURRENT.set(RunningJob(job_id, attempt, book))
            try:
                result = await invoke(delivery, attempt)
            finally:
                CURRENT.reset(token)
            if result is SKIPPED:
                return result  # a duplicate of a message handled before: its job is recorded
            if job_id in book.cancels:
                record(c.Change(job_id, c.CANCELLED, clock.now(), attempt, queue))
                return result
            encoded = _encode(job_id, result, limit)
            record(c.Change(job_id, c.SUCCEEDED, clock.now(), attempt, queue, result=encoded))
            return result

        return tracked

    def settled(self, delivery: DeliveredMessage, plan: Plan, action: Action) -> None:
        job_id = delivery.header.properties.message_id
        if not job_id:
            return
        ran = job_id in self._running
        self._running.discard(job_id)
        if action is Action.ACK:
            return  # succeeded or cancelled, recorded when the handler returned
        retried = plan.action is Action.RETRY
        if action is plan.action and (action is Action.DEAD_LETTER or action is Action.DROP):
            kind, attempt = c.FAILED, plan.attempt
        elif action is plan.action and retried:
            kind, attempt = c.RETRYING, plan.attempt - 1
        elif ran:
            # It ran, and waits without its attempt spent (a store that did not answer, a
            # Retry that spends none), or its copy was not published and it comes back.
            kind, attempt = c.RETRYING, plan.attempt - 1 if retried else plan.attempt
        else:
            return  # not run here (a not-before wait): as it was
        error = _error(plan)
        due = None if kind == c.FAILED else _due(plan)
        change = c.Change(
            job_id, kind, clock.now(), max(attempt, 1), self.queue, due_at=due, **error
        )
        self._book.record(change)


def _encode(job_id: str, result: Any, limit: int) -> str:
    try:
        encoded = to_json(result).decode()
    except (PydanticSerializationError, TypeError, ValueError) as exc:
        raise JobResultError(job_id, f"not JSON ({exc})") from None
    if len(encoded) > limit:
        raise JobResultError(
            job_id, f"{len(encoded)} bytes of JSON, over the store's limit of {limit} bytes"
        )
    return encoded


def _due(plan: Plan) -> float:
    """When the next attempt is due: the copy's not-before, its tier's delay, or the
    backoff before the original comes back."""
    if plan.not_before is not None:
        due = h.read_epoch(plan.not_before)
        if due is not None:
            return due
    return clock.now() + (plan.delay_ms / 1000 if plan.delay_ms else plan.after)


def _error(plan: Plan) -> dict[str, Any]:
    exc = plan.error
    if exc is None:
        return {"error": plan.reason or None, "error_type": None}
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return {"error": h.keep_head(text, h.ERROR_MESSAGE_LIMIT), "error_type": h.error_type(exc)}
