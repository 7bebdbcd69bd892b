"""A :class:`Change`: one job transition as the worker (or a client) records it.

Every store applies the same rules, so that a change arriving late (another process's,
or one delayed by an outage) never moves a job backwards:

| change | applied when the job is |
|---|---|
| ``queued`` | unknown (a publish; the worker may have started it already) |
| ``replayed`` | ``failed`` or unknown (a DLQ replay: ``queued`` again, attempt 0) |
| ``running`` | not ``succeeded``/``cancelled``, and not on a later attempt unless ``failed`` |
| ``retrying`` | not finished, and not on a later attempt |
| ``progress`` | ``running`` on the same attempt |
| ``succeeded`` | in any state: the handler returned, that is the truth |
| ``failed`` | not ``succeeded``/``cancelled`` |
| ``cancelled`` | not ``succeeded``/``failed`` |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from rabbitflow.job import JobState, JobStatus

QUEUED: Final = "queued"
REPLAYED: Final = "replayed"
RUNNING: Final = "running"
RETRYING: Final = "retrying"
PROGRESS: Final = "progress"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"

# The changes that finish a job: waiters of job.result() are told.
FINISHING: Final = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a setattr call per field
class Change:
    """One transition of ``job_id``; ``at`` and ``due_at`` are epoch seconds, ``result``
    the JSON text of a ``succeeded`` job's result."""

    job_id: str
    kind: str
    at: float
    attempt: int = 0
    queue: str | None = None
    result: str | None = None
    error: str | None = None
    error_type: str | None = None
    due_at: float | None = None
    progress: float | None = None
    note: str | None = None
    # When the attempt started: a ``running`` change merged into the one that ended its
    # attempt (see :func:`coalesce`).
    started_at: float | None = None

    @property
    def finishes(self) -> bool:
        return self.kind in FINISHING


ENDS_ATTEMPT: Final = frozenset({SUCCEEDED, RETRYING, FAILED})


def coalesce(batch: list[Change]) -> list[Change]:
    """``batch`` with each ``running`` change, and the progress after it, merged into the
    change that ended the same attempt later in the batch: one write instead of several,
    with the same record as the result. Under load nearly every job starts and ends within
    one batch. (The merged change is updated in place: merging it again, when the batch is
    written again after a failed write, gives the same change.)"""
    if len(batch) < 2:
        return batch
    out: list[Change | None] = []
    starts: dict[str, list[int]] = {}  # job -> indexes in out of its running and progress
    for change in batch:
        kind = change.kind
        if kind == RUNNING:
            starts[change.job_id] = [len(out)]
        elif kind == PROGRESS:
            if change.job_id in starts:
                starts[change.job_id].append(len(out))
        else:
            merged = starts.pop(change.job_id, None)
            ends = merged is not None and kind in ENDS_ATTEMPT
            if ends and _merge(change, [out[index] for index in merged or ()]):
                for index in merged or ():
                    out[index] = None
        out.append(change)
    return [change for change in out if change is not None]


def _merge(end: Change, before: list[Change | None]) -> bool:
    """Merge a running change and its progress (``before``) into ``end``, the change that
    ended the same attempt; whether they were of the same attempt."""
    start = before[0]
    if start is None or start.attempt != end.attempt:
        return False
    end.started_at = start.at
    end.queue = end.queue or start.queue
    for progress in before[1:]:
        if progress is not None and progress.attempt == end.attempt:
            end.progress, end.note = progress.progress, progress.note
    return True


def apply(current: dict[str, Any] | None, change: Change) -> dict[str, Any] | None:
    """The record after ``change`` (a new dict), or None when the rules refuse it: the
    reference implementation of the table above (the memory store's, and the tests')."""
    state = None if current is None else current["state"]
    attempt = 0 if current is None else int(current.get("attempt") or 0)
    kind = change.kind
    record = dict(current or {"id": change.job_id, "created_at": change.at, "attempt": 0})
    if change.queue:
        record["queue"] = change.queue
    if kind == QUEUED:
        if state is not None:
            return None
        record.update(state=QUEUED, created_at=change.at)
    elif kind == REPLAYED:
        if state not in (None, FAILED):
            return None
        # The replayed message starts again at attempt 1.
        record.update(
            state=QUEUED, attempt=0, finished_at=None, due_at=None, cancel_requested=False
        )
    elif kind == RUNNING:
        if state in (SUCCEEDED, CANCELLED) or (state != FAILED and change.attempt < attempt):
            return None
        record.update(
            state=RUNNING,
            attempt=change.attempt,
            started_at=change.at,
            finished_at=None,
            due_at=None,
            progress=None,
            note=None,
        )
    elif kind == RETRYING:
        if state in (SUCCEEDED, FAILED, CANCELLED) or change.attempt < attempt:
            return None
        record.update(
            state=RETRYING,
            attempt=change.attempt,
            due_at=change.due_at,
            error=change.error,
            error_type=change.error_type,
        )
    elif kind == PROGRESS:
        if state != RUNNING or change.attempt != attempt:
            return None
        record.update(progress=change.progress, note=change.note)
    elif kind == SUCCEEDED:
        record.update(
            state=SUCCEEDED,
            attempt=max(attempt, change.attempt),
            finished_at=change.at,
            due_at=None,
            result=change.result,
            progress=1.0,
        )
    elif kind == FAILED:
        if state in (SUCCEEDED, CANCELLED):
            return None
        record.update(
            state=FAILED,
            attempt=max(attempt, change.attempt),
            finished_at=change.at,
            due_at=None,
            error=change.error,
            error_type=change.error_type,
        )
    elif kind == CANCELLED:
        if state in (SUCCEEDED, FAILED):
            return None
        record.update(state=CANCELLED, finished_at=change.at, due_at=None)
    else:  # pragma: no cover - every kind is listed above
        raise ValueError(f"unknown job change {kind!r}")
    if change.started_at is not None:  # a running change (and its progress) merged in
        record.update(started_at=change.started_at, note=change.note)
        if kind != SUCCEEDED:
            record["progress"] = change.progress
    record["updated_at"] = change.at
    return record


def status_of(record: dict[str, Any]) -> JobStatus:
    """The :class:`JobStatus` of a stored record (times as epoch seconds, the result as
    JSON text)."""
    result = record.get("result")
    return JobStatus(
        id=record["id"],
        state=JobState(record["state"]),
        queue=record.get("queue") or None,
        attempt=int(record.get("attempt") or 0),
        created_at=_time(record.get("created_at")),
        started_at=_time(record.get("started_at")),
        finished_at=_time(record.get("finished_at")),
        due_at=_time(record.get("due_at")),
        progress=None if record.get("progress") is None else float(record["progress"]),
        note=record.get("note") or None,
        result=None if result is None else json.loads(result),
        error=record.get("error") or None,
        error_type=record.get("error_type") or None,
        cancel_requested=bool(record.get("cancel_requested")),
    )


def _time(value: object) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(float(value), UTC)  # type: ignore[arg-type]
