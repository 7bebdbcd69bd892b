"""``PostgresStore``: idempotency keys in a PostgreSQL table (``pip install
'rabbitflow[postgres]'``), created on first use.

A row per message: ``(key, owner, done, expires_at)``. A claim is one ``INSERT … ON
CONFLICT`` that takes a missing key or one whose lease (or ttl) is over, so two processes
can never both hold a live claim; done rows past their ttl are swept now and then.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from rabbitflow._urls import mask_url
from rabbitflow.idempotency._store import (
    CLAIMED,
    DEFAULT_LEASE,
    DEFAULT_TTL,
    DONE,
    ClaimResult,
    ClaimState,
    durations,
)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Done rows past their ttl are deleted after this many completions by one process.
SWEEP_EVERY = 1000


class PostgresStore:
    """Keys in PostgreSQL, shared by every process of a deployment.

    ``url`` is a ``postgresql://`` connection string; ``table`` is created if missing;
    ``ttl`` is how long a done key is remembered, ``lease`` how long a claim blocks
    duplicates while its handler runs; ``pool_size`` caps the connections."""

    __slots__ = (
        "_completed",
        "_lock",
        "_pool",
        "_sql",
        "lease_ms",
        "pool_size",
        "table",
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
    ) -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table {table!r} is not a plain lower-case SQL identifier")
        self.ttl_ms, self.lease_ms = durations(ttl, lease)
        self.url = url
        self.table = table
        self.pool_size = pool_size
        self._pool: Any = None
        self._lock = asyncio.Lock()
        self._completed = 0
        self._sql = _statements(table)

    async def _connected(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                self._pool = await self._open()
        return self._pool

    async def _open(self) -> Any:
        try:
            from psycopg_pool import AsyncConnectionPool
        except ImportError:  # pragma: no cover - depends on the environment
            from rabbitflow.errors import ConfigurationError

            raise ConfigurationError(
                "PostgresStore needs psycopg: pip install 'rabbitflow[postgres]'"
            ) from None
        pool = AsyncConnectionPool(
            self.url, min_size=1, max_size=self.pool_size, open=False, kwargs={"autocommit": True}
        )
        await pool.open(wait=True, timeout=10.0)
        async with pool.connection() as conn:
            await conn.execute(self._sql["create"])
        return pool

    async def _execute(self, name: str, params: tuple[Any, ...]) -> Any:
        pool = await self._connected()
        async with pool.connection() as conn:
            cursor = await conn.execute(self._sql[name], params)
            return await cursor.fetchone() if cursor.description else None

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
            await self._execute("sweep", ())

    async def release(self, key: str, owner: str) -> None:
        await self._execute("release", (key, owner))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def __repr__(self) -> str:
        return f"PostgresStore({mask_url(self.url)!r}, table={self.table!r})"


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
