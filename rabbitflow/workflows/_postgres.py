"""Workflows in PostgreSQL (``App(jobs=PostgresStore(...))``).

Two tables beside the store's own: ``<table>_flows`` (one row per workflow) and
``<table>_flow_results`` (one row per chord member). The barrier is one statement: the
member's row is inserted unless it exists, and the workflow's row counts it and names the
claimant in the same statement. Concurrent members of one workflow all update its row, so
PostgreSQL runs their updates one after the other, each on the count the one before left
(READ COMMITTED re-reads a row updated meanwhile): two members cannot both miss the last
place. Expired workflows are deleted now and then by the process that creates one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from rabbitflow import _clock as clock
from rabbitflow._urls import mask_url
from rabbitflow.idempotency._store import bounded
from rabbitflow.workflows._record import CLAIM, UNKNOWN, WAIT, FlowRecord

SWEEP_EVERY = 100

Pool = Callable[[], Awaitable[Any]]

_CREATE = """
CREATE TABLE IF NOT EXISTS {flows} (
    id text PRIMARY KEY,
    kind text NOT NULL,
    steps jsonb NOT NULL,
    members integer NOT NULL,
    recorded integer NOT NULL DEFAULT 0,
    claimant integer,
    published boolean NOT NULL DEFAULT false,
    cancelled boolean NOT NULL DEFAULT false,
    state text NOT NULL,
    done text[] NOT NULL DEFAULT '{{}}',
    failed text,
    error text,
    result text,
    created_at double precision,
    finished_at double precision,
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {results} (
    flow_id text NOT NULL,
    member integer NOT NULL,
    result text NOT NULL,
    PRIMARY KEY (flow_id, member)
)
"""
# A step that succeeded after all (its dead letter replayed) takes its workflow back from
# failed to running.
_RECOVER = """
    state = CASE WHEN failed = %(label)s THEN 'running' ELSE state END,
    error = CASE WHEN failed = %(label)s THEN NULL ELSE error END,
    finished_at = CASE WHEN failed = %(label)s THEN NULL ELSE finished_at END,
    failed = CASE WHEN failed = %(label)s THEN NULL ELSE failed END"""


def _statements(flows: str, results: str) -> dict[str, str]:
    return {
        "create_tables": _CREATE.format(flows=flows, results=results),
        "create": f"""
            INSERT INTO {flows} (id, kind, steps, members, state, created_at, expires_at)
            VALUES (%(f)s, %(kind)s, %(steps)s, %(n)s, %(state)s, %(now)s,
                    now() + %(ttl)s * interval '1 millisecond')
            ON CONFLICT (id) DO NOTHING""",
        "record": f"""
            WITH added AS (
                INSERT INTO {results} (flow_id, member, result) VALUES (%(f)s, %(m)s, %(r)s)
                ON CONFLICT DO NOTHING RETURNING 1
            )
            UPDATE {flows} SET
                recorded = recorded + (SELECT count(*) FROM added),
                claimant = CASE
                    WHEN claimant IS NULL AND recorded + (SELECT count(*) FROM added) >= members
                    THEN %(m)s ELSE claimant END,{_RECOVER}
            WHERE id = %(f)s
            RETURNING claimant, published""",
        "results": f"SELECT result FROM {results} WHERE flow_id = %(f)s ORDER BY member",
        "published": f"""
            UPDATE {flows} SET published = true,
                state = CASE WHEN %(fin)s AND state <> 'cancelled' THEN 'succeeded'
                             ELSE state END,
                finished_at = CASE WHEN %(fin)s AND state <> 'cancelled' THEN %(now)s
                                   ELSE finished_at END
            WHERE id = %(f)s""",
        "step_done": f"""
            UPDATE {flows} SET
                done = CASE WHEN %(label)s = ANY(done) THEN done
                            ELSE array_append(done, %(label)s) END,
                result = CASE WHEN %(r)s::text IS NOT NULL THEN %(r)s ELSE result END,{_RECOVER}
            WHERE id = %(f)s""",
        "finish": f"""
            UPDATE {flows} SET state = 'succeeded', finished_at = %(now)s
            WHERE id = %(f)s AND state NOT IN ('cancelled', 'failed')""",
        "fail": f"""
            UPDATE {flows} SET state = 'failed', failed = %(label)s, error = %(e)s,
                finished_at = %(now)s
            WHERE id = %(f)s AND state <> 'cancelled'""",
        "cancel": f"""
            UPDATE {flows} SET cancelled = true,
                state = CASE WHEN state IN ('succeeded', 'failed') THEN state
                             ELSE 'cancelled' END,
                finished_at = CASE WHEN state IN ('succeeded', 'failed') THEN finished_at
                                   ELSE %(now)s END
            WHERE id = %(f)s RETURNING 1""",
        "is_cancelled": f"SELECT cancelled FROM {flows} WHERE id = %(f)s",
        "get": f"""
            SELECT kind, steps, members, state, done, failed, error, result, cancelled,
                   published, created_at, finished_at
            FROM {flows} WHERE id = %(f)s AND expires_at > now()""",
        "members": f"SELECT member FROM {results} WHERE flow_id = %(f)s",
        "sweep": f"""
            WITH gone AS (DELETE FROM {flows} WHERE expires_at < now() RETURNING id)
            DELETE FROM {results} WHERE flow_id IN (SELECT id FROM gone)""",
    }


class PostgresFlows:
    """:class:`~rabbitflow.workflows._store.FlowStore` in PostgreSQL."""

    __slots__ = (
        "_created",
        "_errors",
        "_pool",
        "_preparing",
        "_ready",
        "_sql",
        "table",
        "timeout",
        "url",
    )

    def __init__(self, pool: Pool, timeout: float, table: str, url: str) -> None:
        import psycopg

        self.url = url
        self.timeout = timeout
        self.table = table
        self._pool = pool
        self._sql = _statements(f"{table}_flows", f"{table}_flow_results")
        self._errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        self._ready: Any = None  # the pool its tables were created on
        self._preparing: asyncio.Future[None] | None = None
        self._created = 0

    def __repr__(self) -> str:
        return f"PostgresFlows({mask_url(self.url)!r}, table={self.table!r})"

    async def _prepared(self) -> Any:
        """The store's pool, with the tables. Concurrent callers share one attempt:
        ``CREATE … IF NOT EXISTS`` run twice at once collides in PostgreSQL's catalog."""
        pool = await self._pool()
        if self._ready is pool:
            return pool
        task = self._preparing
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = self._preparing = asyncio.ensure_future(self._prepare(pool))
        await asyncio.shield(task)
        return pool

    async def _prepare(self, pool: Any) -> None:
        async with pool.connection(timeout=self.timeout) as conn:
            await conn.execute(self._sql["create_tables"])
        self._ready = pool

    async def _rows(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return await bounded(self, name, self.timeout, self._run(name, params), self._errors)

    async def _run(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        pool = await self._prepared()
        async with pool.connection(timeout=self.timeout) as conn:
            cursor = await conn.execute(self._sql[name], params)
            return list(await cursor.fetchall()) if cursor.description else []

    async def create(self, record: FlowRecord, ttl_ms: int) -> None:
        await self._rows(
            "create",
            {
                "f": record.id,
                "kind": record.kind,
                "steps": json.dumps(record.steps),
                "n": record.members,
                "state": record.state,
                "now": record.created_at,
                "ttl": ttl_ms,
            },
        )
        self._created += 1
        if self._created % SWEEP_EVERY == 0:
            await self._rows("sweep", {})

    async def record(self, flow: str, member: int, result: bytes) -> int:
        params = {"f": flow, "m": member, "r": result.decode(), "label": f"m{member}"}
        rows = await self._rows("record", params)
        if not rows:
            return UNKNOWN
        claimant, published = rows[0]
        return CLAIM if claimant == member and not published else WAIT

    async def results(self, flow: str) -> list[bytes]:
        return [row[0].encode() for row in await self._rows("results", {"f": flow})]

    async def published(self, flow: str, finished: bool) -> None:
        await self._rows("published", {"f": flow, "fin": finished, "now": clock.now()})

    async def step_done(self, flow: str, label: str, result: bytes | None) -> None:
        text = None if result is None else result.decode()
        await self._rows("step_done", {"f": flow, "label": label, "r": text})
        if result is not None:
            await self._rows("finish", {"f": flow, "now": clock.now()})

    async def fail(self, flow: str, label: str, error: str) -> None:
        await self._rows("fail", {"f": flow, "label": label, "e": error, "now": clock.now()})

    async def cancel(self, flow: str) -> bool:
        return bool(await self._rows("cancel", {"f": flow, "now": clock.now()}))

    async def is_cancelled(self, flow: str) -> bool:
        rows = await self._rows("is_cancelled", {"f": flow})
        return bool(rows and rows[0][0])

    async def get(self, flow: str) -> FlowRecord | None:
        rows = await self._rows("get", {"f": flow})
        if not rows:
            return None
        (kind, steps, members, state, done, failed, error, result, cancelled, published,
         created_at, finished_at) = rows[0]  # fmt: skip
        finished = {f"m{row[0]}" for row in await self._rows("members", {"f": flow})}
        return FlowRecord(
            id=flow,
            kind=kind,
            steps=[(label, queue) for label, queue in steps],
            members=members,
            state=state,
            done=set(done) | finished,
            failed=failed,
            error=error,
            result=result,
            cancelled=cancelled,
            published=published,
            created_at=created_at or 0.0,
            finished_at=finished_at,
        )
