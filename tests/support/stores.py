"""A fresh store of each kind for one test (memory, Redis, PostgreSQL), and its teardown:
the test's Redis keys, or its PostgreSQL table with the tables the job book and the
workflow barrier create beside it."""

from __future__ import annotations

import uuid

from rabbitflow.idempotency import IdempotencyStore, MemoryStore, PostgresStore, RedisStore
from tests.support.services import (
    POSTGRES_URL,
    REDIS_URL,
    delete_prefix,
    drop_table,
    require_postgres,
    require_redis,
)

#: Tables made beside a PostgresStore's own: jobs, workflows and their member results.
BESIDE = ("_jobs", "_flows", "_flow_results")


async def make_store(kind: str, **options: str | int) -> tuple[IdempotencyStore, object]:
    """A fresh store of ``kind`` and a token for :func:`dispose`."""
    if kind == "memory":
        return MemoryStore(**options), None  # type: ignore[arg-type]
    if kind == "redis":
        require_redis()
        prefix = f"rf-test:{uuid.uuid4().hex[:10]}:"
        return RedisStore(REDIS_URL, prefix=prefix, **options), prefix  # type: ignore[arg-type]
    require_postgres()
    table = f"rf_test_{uuid.uuid4().hex[:10]}"
    return PostgresStore(POSTGRES_URL, table=table, **options), table  # type: ignore[arg-type]


async def dispose(kind: str, store: IdempotencyStore, token: object) -> None:
    """Close ``store`` and remove what the test wrote in the shared server."""
    await store.close()
    if kind == "redis":
        await delete_prefix(REDIS_URL, str(token))
    elif kind == "postgres":
        for suffix in (*BESIDE, ""):
            await drop_table(POSTGRES_URL, f"{token}{suffix}")
