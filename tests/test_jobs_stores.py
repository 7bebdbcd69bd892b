"""The rules of job changes (``rabbitflow.jobs._change``) give the same record in every
store, whether the changes come one by one or merged in one batch, and whatever order two
processes' changes land in."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rabbitflow.jobs import Book, Change, JobState
from rabbitflow.jobs import _change as c
from tests.support.stores import dispose, make_store

T0 = time.time()


def at(seconds: float) -> float:
    return T0 + seconds


# (the changes, in the order they land) -> (state, attempt) after them
STORIES: dict[str, tuple[list[Change], tuple[JobState, int]]] = {
    "queued then run": (
        [
            Change("j", c.QUEUED, at(0)),
            Change("j", c.RUNNING, at(1), 1, "q"),
            Change("j", c.PROGRESS, at(2), 1, progress=0.5, note="half"),
            Change("j", c.SUCCEEDED, at(3), 1, "q", result='{"a": 1}'),
        ],
        (JobState.SUCCEEDED, 1),
    ),
    "the worker before the publisher's queued": (
        [
            Change("j", c.RUNNING, at(1), 1, "q"),
            Change("j", c.QUEUED, at(0.5)),
        ],
        (JobState.RUNNING, 1),
    ),
    "a stale running of an earlier attempt": (
        [
            Change("j", c.RUNNING, at(1), 1, "q"),
            Change("j", c.RETRYING, at(2), 1, "q", error="E: x", error_type="E", due_at=at(5)),
            Change("j", c.RUNNING, at(5), 2, "q"),
            Change("j", c.RETRYING, at(2.1), 1, "q", error="late", error_type="E", due_at=at(5)),
            Change("j", c.RUNNING, at(1.1), 1, "q"),
        ],
        (JobState.RUNNING, 2),
    ),
    "failed, replayed, run again": (
        [
            Change("j", c.RUNNING, at(1), 3, "q"),
            Change("j", c.FAILED, at(2), 3, "q", error="E: x", error_type="E"),
            Change("j", c.REPLAYED, at(3)),
            Change("j", c.RUNNING, at(4), 1, "q"),
            Change("j", c.SUCCEEDED, at(5), 1, "q", result="null"),
        ],
        (JobState.SUCCEEDED, 1),  # the replayed message starts again at attempt 1
    ),
    "a replay that lands after the run started": (
        [
            Change("j", c.FAILED, at(2), 3, "q", error="E: x", error_type="E"),
            Change("j", c.RUNNING, at(4), 1, "q"),
            Change("j", c.REPLAYED, at(3)),
        ],
        (JobState.RUNNING, 1),
    ),
    "cancelled, then the worker acks it unrun": (
        [
            Change("j", c.QUEUED, at(0)),
            Change("j", c.CANCELLED, at(1), 1, "q"),
            Change("j", c.RUNNING, at(2), 1, "q"),
            Change("j", c.FAILED, at(3), 1, "q", error="E", error_type="E"),
        ],
        (JobState.CANCELLED, 0),
    ),
    "succeeded stays": (
        [
            Change("j", c.SUCCEEDED, at(3), 2, "q", result="1"),
            Change("j", c.RUNNING, at(4), 2, "q"),
            Change("j", c.FAILED, at(5), 2, "q", error="E", error_type="E"),
            Change("j", c.CANCELLED, at(6), 2, "q"),
        ],
        (JobState.SUCCEEDED, 2),
    ),
}


@pytest.fixture(params=["redis", "postgres", "memory"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    made, token = await make_store(request.param)
    try:
        yield made
    finally:
        await dispose(request.param, made, token)


def fresh(changes: list[Change], job_id: str) -> list[Change]:
    return [
        Change(job_id, **{k: getattr(ch, k) for k in Change.__slots__ if k != "job_id"})
        for ch in changes
    ]


@pytest.mark.parametrize("story", list(STORIES))
async def test_each_store_ends_a_story_in_the_same_state_one_by_one_or_in_a_batch(
    store: Any, story: str
) -> None:
    changes, (state, attempt) = STORIES[story]
    book: Book = store.job_book(3_600_000)
    backend = book._backend
    one, batch = f"one-{uuid.uuid4().hex}", f"batch-{uuid.uuid4().hex}"
    for change in fresh(changes, one):
        await backend.apply([change])
    await backend.apply(c.coalesce(fresh(changes, batch)))
    for job_id in (one, batch):
        status = await book.get(job_id)
        assert status is not None
        assert (status.state, status.attempt) == (state, attempt), job_id
    by_one, by_batch = await book.get(one), await book.get(batch)
    assert by_one is not None
    assert by_batch is not None
    same = {"state", "attempt", "queue", "result", "error", "error_type", "progress", "note"}
    assert by_one.model_dump(include=same) == by_batch.model_dump(include=same)
    assert by_one.started_at == by_batch.started_at
