"""The relay's side of the table: claim a batch, then settle it, one statement each.

Every statement runs in autocommit on the relay's own connection, so a row lock never
outlives its statement: the claim's ``FOR UPDATE SKIP LOCKED`` keeps two relays off the same
rows while they choose, and the lease it writes keeps them off while the batch is published.
A relay that dies leaves its rows leased until ``locked_until``; another relay then claims and
publishes them again, with the same message_id: at most one batch of duplicates.

``round_trips`` counts what the relay asked of PostgreSQL (one statement is one round trip):
the database cost per row that ``bench/outbox.py`` reports and a test gates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rabbitflow.outbox._schema import PARKED, Statements


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row the relay holds a lease on."""

    id: int
    exchange: str
    routing_key: str
    body: bytes
    properties: bytes
    attempts: int
    age: float  # seconds since the row was written
    message_id: str
    job: bool  # written by app.outbox.enqueue
    key: str | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A row the broker refused, why, and how long until it may be tried again."""

    id: int
    error: str
    delay: float


@dataclass(slots=True)
class Settlement:
    """What became of a batch: rows confirmed, refused, and given back unsent."""

    sent: list[int]
    refused: list[Refusal]
    released: list[int]
    jobs: list[str] = field(default_factory=list)  # job ids among the sent rows

    def __bool__(self) -> bool:
        return bool(self.sent or self.refused or self.released)


@dataclass(frozen=True, slots=True)
class Stats:
    pending: int
    oldest_age: float
    parked: int


class Claims:
    """Claims and settlements on one autocommit psycopg ``AsyncConnection``."""

    __slots__ = ("connection", "round_trips", "sql")

    def __init__(self, connection: Any, statements: Statements) -> None:
        self.connection = connection
        self.sql = statements
        self.round_trips = 0

    async def _run(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        self.round_trips += 1
        cursor = await self.connection.execute(sql, params, prepare=True)
        return await cursor.fetchall() if cursor.description else []

    async def claim(self, limit: int, lease: float) -> list[Claimed]:
        return _claimed(await self._run(self.sql.claim, {"limit": limit, "lease": lease}))

    async def settle_and_claim(
        self,
        settlement: Settlement | None,
        limit: int,
        lease: float,
        *,
        delete: bool,
        max_attempts: int,
    ) -> tuple[list[int], list[Claimed]]:
        """Settle the last batch and claim the next in one round trip: the ids parked, and
        the rows claimed.

        The statements go in one pipeline, in order, before one Sync: PostgreSQL runs them
        as one implicit transaction, so the claim sees the rows just marked sent (the next
        row of their key is a head already), and a failure of any undoes all of them."""
        if not settlement:
            return [], await self.claim(limit, lease)
        connection = self.connection
        self.round_trips += 1
        refused = None
        async with connection.pipeline():
            if settlement.sent:
                sql = self.sql.delete_sent if delete else self.sql.sent
                await connection.execute(sql, {"ids": settlement.sent}, prepare=True)
            if settlement.refused:
                refused = await connection.execute(
                    self.sql.refused,
                    _refusal_params(settlement.refused, max_attempts),
                    prepare=True,
                )
            if settlement.released:
                await connection.execute(
                    self.sql.release, {"ids": settlement.released}, prepare=True
                )
            claim = await connection.execute(
                self.sql.claim, {"limit": limit, "lease": lease}, prepare=True
            )
        parked = (
            [] if refused is None else [r[0] for r in await refused.fetchall() if r[1] == PARKED]
        )
        return parked, _claimed(await claim.fetchall())

    async def sent(self, ids: Sequence[int], *, delete: bool) -> None:
        if ids:
            sql = self.sql.delete_sent if delete else self.sql.sent
            await self._run(sql, {"ids": list(ids)})

    async def refused(self, refusals: Sequence[Refusal], max_attempts: int) -> list[int]:
        """Record refusals; return the ids that were parked (out of attempts)."""
        if not refusals:
            return []
        rows = await self._run(self.sql.refused, _refusal_params(refusals, max_attempts))
        return [row[0] for row in rows if row[1] == PARKED]

    async def release(self, ids: Sequence[int]) -> None:
        """Give rows back before their lease ends (they were not sent: no attempt spent)."""
        if ids:
            await self._run(self.sql.release, {"ids": list(ids)})

    async def sweep(self, retention: float, limit: int) -> int:
        self.round_trips += 1
        cursor = await self.connection.execute(
            self.sql.sweep, {"retention": retention, "limit": limit}, prepare=True
        )
        return int(cursor.rowcount)

    async def stats(self) -> Stats:
        (row,) = await self._run(self.sql.stats, {})
        return Stats(int(row[0]), float(row[1]), int(row[2]))


def _claimed(rows: list[tuple[Any, ...]]) -> list[Claimed]:
    claimed = [
        Claimed(
            row[0], row[1], row[2], row[3], row[4], row[5], float(row[6]), row[7], row[8], row[9]
        )
        for row in rows
    ]
    claimed.sort(key=_id)  # UPDATE … RETURNING follows no order
    return claimed


def _refusal_params(refusals: Sequence[Refusal], max_attempts: int) -> dict[str, Any]:
    return {
        "ids": [r.id for r in refusals],
        "errors": [r.error for r in refusals],
        "delays": [r.delay for r in refusals],
        "max_attempts": max_attempts,
    }


def _id(row: Claimed) -> int:
    return row.id
