"""Jobs in PostgreSQL, on the pool of a :class:`~rabbitflow.idempotency.PostgresStore`.

One row per job in ``<table>`` (created on first use, beside the idempotency table). Each
change is one ``INSERT … ON CONFLICT … WHERE`` (the rules of :mod:`rabbitflow.jobs._change`
as the ``WHERE`` of the update); a batch is one transaction sent in pipeline mode, one
round trip. A change that finishes a job notifies ``<table>_done`` (delivered at commit),
which ``job.result()`` listens to on one connection per process; cancellations notify
``<table>_cancel``, which each worker listens to.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from rabbitflow.jobs import _change as c
from rabbitflow.jobs._book import OnCancel

SWEEP_EVERY = 1000

Pool = Callable[[], Awaitable[Any]]


class PostgresJobs:
    """A book's backend on the store's pool (``pool()`` returns it, open)."""

    __slots__ = (
        "_applied",
        "_background",
        "_connect",
        "_listener",
        "_pool",
        "_preparing",
        "_ready",
        "_sql",
        "_waiters",
        "name",
        "table",
        "timeout",
        "ttl_ms",
        "url",
    )

    def __init__(
        self,
        pool: Pool,
        connect: Callable[[], Awaitable[Any]],
        table: str,
        ttl_ms: int,
        timeout: float,
        name: str,
    ) -> None:
        self._pool = pool
        self._connect = connect
        self.table = table
        self.ttl_ms = ttl_ms
        self.timeout = timeout
        self.name = name
        self._sql = _statements(table)
        self._ready: Any = None  # the pool its table was created on
        self._preparing: asyncio.Future[None] | None = None
        self._applied = 0
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def _prepared(self) -> Any:
        """The store's pool, with the jobs table. Concurrent callers share one attempt:
        ``CREATE … IF NOT EXISTS`` run twice at once collides in PostgreSQL's catalog."""
        pool = await self._pool()
        if self._ready is pool:
            return pool
        task = self._preparing
        if task is None or task.done():
            task = self._preparing = asyncio.ensure_future(self._prepare(pool))
        await asyncio.shield(task)
        return pool

    async def _prepare(self, pool: Any) -> None:
        async with pool.connection(timeout=self.timeout) as conn, conn.transaction():
            # Two processes creating the same table at once collide in the catalog (a
            # unique violation) despite IF NOT EXISTS: one waits for the other's lock.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            await conn.execute(self._sql["create"])
            await conn.execute(self._sql["index"])
            await conn.execute(self._sql["cancel_index"])
        self._ready = pool

    def __repr__(self) -> str:
        return self.name

    async def apply(self, changes: Sequence[c.Change]) -> None:
        pool = await self._prepared()
        async with (
            pool.connection(timeout=self.timeout) as conn,
            conn.pipeline(),
            conn.transaction(),
        ):
            # A row past its ttl that the sweep has not deleted yet counts as absent.
            counts = Counter(change.job_id for change in changes)
            await conn.execute(self._sql["expire"], (list(counts),))
            # The jobs with one change in the batch (nearly all): one executemany per kind,
            # whose rows psycopg sends in one pipeline. A job with several goes in order.
            single: dict[str, list[dict[str, Any]]] = {}
            several: list[c.Change] = []
            for change in changes:
                if counts[change.job_id] == 1:
                    single.setdefault(change.kind, []).append(self._params(change))
                else:
                    several.append(change)
            cursor = conn.cursor()
            for kind, rows in single.items():
                await cursor.executemany(self._sql[kind], rows)
            for change in several:
                await cursor.execute(self._sql[change.kind], self._params(change))
        self._applied += len(changes)
        if self._applied >= SWEEP_EVERY:
            self._applied = 0
            task = asyncio.ensure_future(self._sweep())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _params(self, change: c.Change) -> dict[str, Any]:
        return {
            "id": change.job_id,
            "at": change.at,
            "attempt": change.attempt,
            "queue": change.queue,
            "result": change.result,
            "error": change.error,
            "error_type": change.error_type,
            "due_at": change.due_at,
            "progress": change.progress,
            "note": change.note,
            "started_at": change.started_at,
            "ttl_ms": self.ttl_ms,
            "done": f"{self.table}_done",
        }

    async def _sweep(self) -> None:
        with contextlib.suppress(Exception):
            pool = await self._prepared()
            async with pool.connection(timeout=self.timeout) as conn:
                await conn.execute(self._sql["sweep"])

    async def read(self, job_id: str) -> dict[str, Any] | None:
        pool = await self._prepared()
        async with pool.connection(timeout=self.timeout) as conn:
            cursor = await conn.execute(self._sql["read"], (job_id,))
            row = await cursor.fetchone()
            if row is None:
                return None
            names = [column.name for column in cursor.description]
            return dict(zip(names, row, strict=True))

    async def request_cancel(self, job_id: str, at: float) -> dict[str, Any] | None:
        pool = await self._prepared()
        params = {
            "id": job_id,
            "at": at,
            "ttl_ms": self.ttl_ms,
            "done": f"{self.table}_done",
            "cancel": f"{self.table}_cancel",
        }
        async with pool.connection(timeout=self.timeout) as conn:
            await conn.execute(self._sql["cancel"], params)
        return await self.read(job_id)

    async def wait_finished(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        await self._listening()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            # Listening before reading: a finish after the read is heard.
            record = await self.read(job_id)
            if record is not None and record["state"] in c.FINISHING:
                return record
            await asyncio.wait({waiter}, timeout=timeout)
            if waiter.done() and waiter.exception() is not None:
                raise waiter.exception()  # type: ignore[misc]  # the listener's error
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]
        return await self.read(job_id)

    async def _listening(self) -> None:
        task = self._listener
        if task is not None and not task.done():
            return
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._listener = asyncio.ensure_future(self._listen_done(started))
        await asyncio.wait_for(asyncio.shield(started), self.timeout)

    async def _listen_done(self, started: asyncio.Future[None]) -> None:
        try:
            conn = await self._connect()
            async with conn:
                await conn.execute(f"LISTEN {self.table}_done")
                started.set_result(None)
                async for notify in conn.notifies():
                    for waiter in self._waiters.get(notify.payload, ()):
                        if not waiter.done():
                            waiter.set_result(None)
        except Exception as exc:
            if not started.done():
                started.set_exception(exc)
            for waiters in self._waiters.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)

    async def recent_cancels(self) -> list[str]:
        pool = await self._prepared()
        async with pool.connection(timeout=self.timeout) as conn:
            cursor = await conn.execute(self._sql["recent_cancels"])
            return [row[0] for row in await cursor.fetchall()]

    async def listen_cancels(self, on_cancel: OnCancel) -> None:
        await self._prepared()
        conn = await self._connect()
        async with conn:
            await conn.execute(f"LISTEN {self.table}_cancel")
            async for notify in conn.notifies():
                on_cancel(notify.payload)

    async def close(self) -> None:
        task, self._listener = self._listener, None
        for each in [task, *self._background]:
            if each is not None:
                each.cancel()
                with contextlib.suppress(BaseException):
                    await each


def connect_timeout(timeout: float) -> int:
    return max(2, math.ceil(timeout))


_COLUMNS = "id, state, queue, attempt, created_at, updated_at, expires_at"


def _insert(table: str, state: str, extra: dict[str, str]) -> str:
    """``INSERT`` of a new row in ``state`` with ``extra`` columns (name → SQL value)."""
    names = ", ".join([_COLUMNS, *extra])
    values = ", ".join(
        [
            "%(id)s",
            f"'{state}'",
            "%(queue)s",
            "%(attempt)s",
            "to_timestamp(%(at)s)",
            "to_timestamp(%(at)s)",
            "to_timestamp(%(at)s) + %(ttl_ms)s * interval '1 millisecond'",
            *extra.values(),
        ]
    )
    return f"INSERT INTO {table} AS t ({names}) VALUES ({values})"


_TOUCH = (
    "queue = coalesce(excluded.queue, t.queue), updated_at = excluded.updated_at, "
    "expires_at = excluded.expires_at"
)


def _notified(statement: str) -> str:
    return f"WITH w AS ({statement} RETURNING t.id) SELECT pg_notify(%(done)s, id) FROM w"


def _statements(table: str) -> dict[str, str]:
    # ``table`` is checked as a plain identifier by the store: the only text put into SQL.
    finished = {"finished_at": "to_timestamp(%(at)s)"}
    # A change that ended an attempt may carry its start (a running change merged into it).
    started = "started_at = coalesce(excluded.started_at, t.started_at)"
    merged = {
        "started_at": "to_timestamp(%(started_at)s::float8)",
        "progress": "%(progress)s",
        "note": "%(note)s",
    }
    fresh = (
        "progress = CASE WHEN excluded.started_at IS NULL THEN t.progress "
        "ELSE excluded.progress END, "
        "note = CASE WHEN excluded.started_at IS NULL THEN t.note ELSE excluded.note END"
    )
    return {
        "create": f"""
            CREATE TABLE IF NOT EXISTS {table} (
                id text PRIMARY KEY,
                state text NOT NULL,
                queue text,
                attempt integer NOT NULL DEFAULT 0,
                created_at timestamptz,
                started_at timestamptz,
                finished_at timestamptz,
                due_at timestamptz,
                updated_at timestamptz NOT NULL,
                expires_at timestamptz NOT NULL,
                progress double precision,
                note text,
                result text,
                error text,
                error_type text,
                cancel_requested boolean NOT NULL DEFAULT false
            )""",
        "index": f"CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires_at)",
        "cancel_index": (
            f"CREATE INDEX IF NOT EXISTS {table}_cancels ON {table} (expires_at) "
            "WHERE cancel_requested"
        ),
        c.QUEUED: _insert(table, "queued", {}) + " ON CONFLICT (id) DO NOTHING",
        c.REPLAYED: _insert(table, "queued", {})
        + " ON CONFLICT (id) DO UPDATE SET state = 'queued', attempt = 0, finished_at = NULL, "
        f"due_at = NULL, cancel_requested = false, {_TOUCH} WHERE t.state = 'failed'",
        c.RUNNING: _insert(table, "running", {"started_at": "to_timestamp(%(at)s)"})
        + " ON CONFLICT (id) DO UPDATE SET state = 'running', attempt = excluded.attempt, "
        "started_at = excluded.started_at, finished_at = NULL, due_at = NULL, "
        f"progress = NULL, note = NULL, {_TOUCH} "
        "WHERE t.state NOT IN ('succeeded', 'cancelled') "
        "AND (t.state = 'failed' OR excluded.attempt >= t.attempt)",
        c.RETRYING: _insert(
            table,
            "retrying",
            {
                "due_at": "to_timestamp(%(due_at)s)",
                "error": "%(error)s",
                "error_type": "%(error_type)s",
                **merged,
            },
        )
        + " ON CONFLICT (id) DO UPDATE SET state = 'retrying', attempt = excluded.attempt, "
        "due_at = excluded.due_at, error = excluded.error, error_type = excluded.error_type, "
        f"{started}, {fresh}, {_TOUCH} WHERE t.state NOT IN ('succeeded', 'failed', 'cancelled') "
        "AND excluded.attempt >= t.attempt",
        c.PROGRESS: f"UPDATE {table} SET progress = %(progress)s, note = %(note)s, "
        "updated_at = to_timestamp(%(at)s), "
        "expires_at = to_timestamp(%(at)s) + %(ttl_ms)s * interval '1 millisecond' "
        "WHERE id = %(id)s AND state = 'running' AND attempt = %(attempt)s",
        c.SUCCEEDED: _notified(
            _insert(
                table,
                "succeeded",
                {
                    **finished,
                    "result": "%(result)s",
                    "progress": "1",
                    "started_at": merged["started_at"],
                    "note": "%(note)s",
                },
            )
            + " ON CONFLICT (id) DO UPDATE SET state = 'succeeded', "
            "attempt = greatest(t.attempt, excluded.attempt), "
            "finished_at = excluded.finished_at, due_at = NULL, result = excluded.result, "
            "progress = 1, "
            "note = CASE WHEN excluded.started_at IS NULL THEN t.note ELSE excluded.note END, "
            f"{started}, {_TOUCH}"
        ),
        c.FAILED: _notified(
            _insert(
                table,
                "failed",
                {**finished, "error": "%(error)s", "error_type": "%(error_type)s", **merged},
            )
            + " ON CONFLICT (id) DO UPDATE SET state = 'failed', "
            "attempt = greatest(t.attempt, excluded.attempt), "
            "finished_at = excluded.finished_at, due_at = NULL, error = excluded.error, "
            f"error_type = excluded.error_type, {started}, {fresh}, {_TOUCH} "
            "WHERE t.state NOT IN ('succeeded', 'cancelled')"
        ),
        c.CANCELLED: _notified(
            _insert(table, "cancelled", {"finished_at": "to_timestamp(%(at)s)"})
            + " ON CONFLICT (id) DO UPDATE SET state = 'cancelled', "
            f"finished_at = excluded.finished_at, due_at = NULL, {_TOUCH} "
            "WHERE t.state NOT IN ('succeeded', 'failed')"
        ),
        "cancel": f"""
            WITH u AS (
                UPDATE {table} AS t SET
                    state = CASE WHEN t.state IN ('queued', 'retrying')
                                 THEN 'cancelled' ELSE t.state END,
                    finished_at = CASE WHEN t.state IN ('queued', 'retrying')
                                       THEN to_timestamp(%(at)s) ELSE t.finished_at END,
                    due_at = NULL,
                    cancel_requested = true,
                    updated_at = to_timestamp(%(at)s),
                    expires_at = to_timestamp(%(at)s) + %(ttl_ms)s * interval '1 millisecond'
                WHERE t.id = %(id)s AND t.expires_at > now()
                  AND t.state IN ('queued', 'retrying', 'running')
                RETURNING t.id, t.state
            )
            SELECT pg_notify(%(cancel)s, id),
                   CASE WHEN state = 'cancelled' THEN pg_notify(%(done)s, id) END
            FROM u""",
        "read": f"""
            SELECT id, state, queue, attempt, created_at, started_at, finished_at, due_at,
                   progress, note, result, error, error_type, cancel_requested
            FROM {table} WHERE id = %s AND expires_at > now()""",
        "recent_cancels": f"""
            SELECT id FROM {table} WHERE cancel_requested AND expires_at > now()
            ORDER BY updated_at DESC LIMIT 100000""",
        "sweep": f"DELETE FROM {table} WHERE expires_at <= now()",
        "expire": f"DELETE FROM {table} WHERE id = ANY(%s) AND expires_at <= now()",
    }
