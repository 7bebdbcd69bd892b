"""``PostgresStore``: idempotency keys in a PostgreSQL table (``pip install
'rabbitflow[postgres]'``), created on first use.

A row per message: ``(key, owner, done, expires_at)``. A claim is one ``INSERT … ON
CONFLICT`` that takes a missing key or one whose lease (or ttl) is over, so two processes
can never both hold a live claim; done rows past their ttl are swept now and then.

Every call is bounded by the store's ``timeout`` (the wait for a pooled connection
included) and runs on its own pooled connection, concurrently with the others; any failure
of PostgreSQL is raised as :class:`~rabbitflow.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from rabbitflow._urls import mask_url
from rabbitflow.errors import StoreUnavailableError
from rabbitflow.idempotency._store import (
    CLAIMED,
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    DEFAULT_TTL,
    DONE,
    ClaimResult,
    ClaimState,
    bounded,
    durations,
    timeout_seconds,
)

if TYPE_CHECKING:
    from rabbitflow.jobs._book import Book

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Done rows past their ttl are deleted after this many completions by one process.
SWEEP_EVERY = 1000


class PostgresStore:
    """Keys in PostgreSQL, shared by every process of a deployment.

    ``url`` is a ``postgresql://`` connection string; ``table`` is created if missing;
    ``ttl`` is how long a done key is remembered, ``lease`` how long a claim blocks
    duplicates while its handler runs; ``pool_size`` caps the connections; ``timeout``
    bounds each call, the wait for a pooled connection included (a duration, or seconds as
    a float): beyond it PostgreSQL counts as unavailable."""

    __slots__ = (
        "_background",
        "_completed",
        "_errors",
        "_pool",
        "_pool_class",
        "_preparing",
        "_psycopg",
        "_ready",
        "_sql",
        "_stale",
        "lease_ms",
        "pool_size",
        "table",
        "timeout",
        "ttl_ms",
        "url",
    )

    def __init__(
        self,
        url: str = "postgresql://127.0.0.1:5432/postgres",
        *,
        ttl: str | int = DEFAULT_TTL,
        lease: str | int = DEFAULT_LEASE,
        table: str = "rabbitflow_idempotency",
        pool_size: int = 10,
        timeout: str | int | float = DEFAULT_TIMEOUT,
    ) -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table {table!r} is not a plain lower-case SQL identifier")
        self.ttl_ms, self.lease_ms = durations(ttl, lease)
        self.timeout = timeout_seconds(timeout)
        self.url = url
        self.table = table
        self.pool_size = pool_size
        self._pool: Any = None  # opened on first use, replaced after an outage
        self._ready: Any = None  # the pool, once its table is known to exist
        self._preparing: asyncio.Future[Any] | None = None
        self._stale = False  # a call failed: the pool's connections may be dead
        self._background: set[asyncio.Future[Any]] = set()
        self._completed = 0
        self._sql = _statements(table)
        self._psycopg, self._pool_class = _client()
        self._errors: tuple[type[BaseException], ...] = (self._psycopg.Error,)

    async def _prepared(self) -> Any:
        """The pool, open, with its table. Concurrent callers share one attempt, so that an
        unreachable server costs each of them one deadline, not one each in turn."""
        if self._ready is not None:
            return self._ready
        task = self._preparing
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = self._preparing = self._spawn(self._prepare())
        return await asyncio.shield(task)

    async def _prepare(self) -> Any:
        pool = self._pool
        if pool is None:
            pool = self._pool = await self._open_pool()
        async with pool.connection(timeout=self.timeout) as conn, conn.transaction():
            # Two processes creating the same table at once collide in the catalog (a
            # unique violation) despite IF NOT EXISTS: one waits for the other's lock.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            await conn.execute(self._sql["create"])
        self._ready = pool
        return pool

    async def _open_pool(self) -> Any:
        pool = self._pool_class(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.timeout,
            name=f"rabbitflow idempotency ({self.table})",
            kwargs={"autocommit": True, "connect_timeout": max(2, math.ceil(self.timeout))},
        )
        # Not waiting for the first connection: calls wait for one (up to the timeout).
        await pool.open(wait=False)
        return pool

    async def _run(self, name: str, params: tuple[Any, ...]) -> Any:
        pool = await self._prepared()
        async with pool.connection(timeout=self.timeout) as conn:
            cursor = await conn.execute(self._sql[name], params)
            return await cursor.fetchone() if cursor.description else None

    async def _execute(self, name: str, params: tuple[Any, ...]) -> Any:
        try:
            return await bounded(self, name, self.timeout, self._run(name, params), self._errors)
        except StoreUnavailableError:
            self._stale = True
            raise

    async def claim(self, key: str, owner: str, lease_ms: int) -> ClaimResult:
        row = await self._execute("claim", (key, owner, lease_ms, key))
        if row is None:
            # Another transaction claimed the key after this statement's snapshot was taken.
            return ClaimResult(ClaimState.BUSY, 0)
        claimed, done, remaining_ms = row
        if claimed:
            return CLAIMED
        return DONE if done else ClaimResult(ClaimState.BUSY, int(remaining_ms))

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        await self._execute("complete", (key, owner, ttl_ms))
        self._completed += 1
        if self._completed % SWEEP_EVERY == 0:
            self._spawn(self._sweep())

    async def _sweep(self) -> None:
        # Apart from the message that triggered it: a slow sweep delays nobody's ack.
        with contextlib.suppress(StoreUnavailableError):
            await self._execute("sweep", ())

    async def release(self, key: str, owner: str) -> None:
        await self._execute("release", (key, owner))

    async def ping(self) -> None:
        """A fresh connection to the server and the table created if missing; raises
        StoreUnavailableError when the server does not answer. After an outage the pool
        is replaced: its connections are dead, and its own reconnection backs off up to
        minutes."""
        await bounded(self, "ping", self.timeout, self._ping(), self._errors)
        if self._stale:
            self._stale = False
            old, self._pool, self._ready, self._preparing = self._pool, None, None, None
            if old is not None:
                self._spawn(old.close())

    async def _ping(self) -> None:
        conn = await self._psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=max(2, math.ceil(self.timeout))
        )
        async with conn:
            await conn.execute(self._sql["create"])

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(_forget(self._background))
        return task

    async def close(self) -> None:
        pool, self._pool, self._ready, self._preparing = self._pool, None, None, None
        if pool is not None:
            # Bounded: a pool still trying to connect to a server that is down would wait
            # for its connect timeout.
            await pool.close(timeout=self.timeout)
        for task in list(self._background):
            task.cancel()

    def job_book(
        self, ttl_ms: int, *, table: str | None = None, max_result_bytes: int | None = None
    ) -> Book:
        """Job statuses on this store's pool (``App(jobs=PostgresStore(...))``; contract
        section 12): rows of ``table`` (default: this store's table with ``_jobs`` for
        ``_idempotency``), kept ``ttl_ms`` after their last change."""
        from rabbitflow.jobs._book import Book
        from rabbitflow.jobs._postgres import PostgresJobs

        if table is None:
            base = self.table.removesuffix("_idempotency")
            table = f"{base}_jobs" if base != self.table else f"{self.table}_jobs"
        if not _IDENTIFIER.match(table) or len(table) > 50:
            raise ValueError(f"jobs table {table!r} is not a short lower-case SQL identifier")

        async def listener() -> Any:
            return await self._psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(2, math.ceil(self.timeout))
            )

        backend = PostgresJobs(self._prepared, listener, table, ttl_ms, self.timeout, repr(self))
        limit = {} if max_result_bytes is None else {"max_result_bytes": max_result_bytes}
        return Book(backend, ttl_ms, **limit)

    def __repr__(self) -> str:
        return f"PostgresStore({mask_url(self.url)!r}, table={self.table!r})"


def _client() -> tuple[Any, Any]:
    """psycopg and its pool class, or a ConfigurationError naming the extra to install."""
    try:
        import psycopg
        from psycopg_pool import AsyncConnectionPool
    except ImportError:  # pragma: no cover - depends on the environment
        from rabbitflow.errors import ConfigurationError

        raise ConfigurationError(
            "PostgresStore needs psycopg: pip install 'rabbitflow[postgres]'"
        ) from None
    return psycopg, AsyncConnectionPool


def _forget(tasks: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed attempt is reported to its callers

    return done


def _statements(table: str) -> dict[str, str]:
    # ``table`` is checked against _IDENTIFIER: the only text put into SQL here.
    return {
        "create": f"""
            CREATE TABLE IF NOT EXISTS {table} (
                key text PRIMARY KEY,
                owner text NOT NULL,
                done boolean NOT NULL,
                expires_at timestamptz NOT NULL
            )""",
        # The CTE's INSERT either takes the key (a row in "taken") or leaves it alone; the
        # SELECT then reads the row as it was before this statement: done, or a live lease.
        "claim": f"""
            WITH taken AS (
                INSERT INTO {table} AS t (key, owner, done, expires_at)
                VALUES (%s, %s, false, now() + %s * interval '1 millisecond')
                ON CONFLICT (key) DO UPDATE
                    SET owner = excluded.owner, done = false, expires_at = excluded.expires_at
                    WHERE t.expires_at <= now()
                RETURNING 1
            )
            SELECT true, false, 0::bigint FROM taken
            UNION ALL
            SELECT false, done,
                   greatest(1, ceil(extract(epoch FROM expires_at - now()) * 1000))::bigint
            FROM {table} WHERE key = %s AND NOT EXISTS (SELECT 1 FROM taken)""",
        "complete": f"""
            INSERT INTO {table} (key, owner, done, expires_at)
            VALUES (%s, %s, true, now() + %s * interval '1 millisecond')
            ON CONFLICT (key) DO UPDATE
                SET owner = excluded.owner, done = true, expires_at = excluded.expires_at""",
        "release": f"DELETE FROM {table} WHERE key = %s AND owner = %s AND NOT done",
        "sweep": f"DELETE FROM {table} WHERE expires_at <= now()",
    }
