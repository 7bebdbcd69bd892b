"""Job status in SQLite: the API creates a row, the worker updates it, the API reads it.

SQLite is enough for the example because the API and the worker run on one machine and share
the file (``$JOBS_DB``, default ``./jobs.sqlite3``). A real deployment keeps job status in its
own database (PostgreSQL, Redis...), where both processes can reach it from any host.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from examples.jobs_api.models import Job, Status

SCHEMA = """
create table if not exists jobs (
    job_id text primary key,
    status text not null,
    attempt integer not null default 0,
    result text,
    error text,
    updated_at text not null
)
"""


class JobStore:
    """One short-lived connection per call: safe from the worker's threads and across processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=10)) as db:
            db.execute(SCHEMA)
            with db:  # one transaction, committed on success
                yield db

    def create(self, job_id: str) -> Job:
        now = _now()
        with self._db() as db:
            db.execute(
                "insert into jobs (job_id, status, updated_at) values (?, 'queued', ?)",
                (job_id, now),
            )
        return Job(job_id=job_id, status="queued", updated_at=datetime.fromisoformat(now))

    def update(
        self,
        job_id: str,
        status: Status,
        *,
        attempt: int | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        with self._db() as db:
            db.execute(
                "update jobs set status = ?, attempt = coalesce(?, attempt), result = ?,"
                " error = ?, updated_at = ? where job_id = ?",
                (status, attempt, _json(result), error, _now(), job_id),
            )

    def get(self, job_id: str) -> Job | None:
        with self._db() as db:
            row = db.execute(
                "select job_id, status, attempt, result, error, updated_at from jobs"
                " where job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        job_id, status, attempt, result, error, updated_at = row
        return Job(
            job_id=job_id,
            status=status,
            attempt=attempt,
            result=json.loads(result) if result else None,
            error=error,
            updated_at=datetime.fromisoformat(updated_at),
        )


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value)


store = JobStore(os.environ.get("JOBS_DB", "jobs.sqlite3"))
