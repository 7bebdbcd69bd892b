"""Operations on an outbox table: list rows, retry parked ones, purge, read the lag.

What ``rabbitflow outbox list|retry|purge`` and the console run, each on a connection of
its own (``PostgresOutbox.connect``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from rabbitflow.outbox._claims import Claims, Stats

if TYPE_CHECKING:
    from rabbitflow.outbox._outbox import PostgresOutbox


@dataclass(frozen=True, slots=True)
class Row:
    """One row as an operator sees it (the body is not read, only its size)."""

    id: int
    key: str | None
    exchange: str
    routing_key: str
    message_id: str
    state: str
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    available_at: datetime
    error: str | None
    size: int


async def list_rows(outbox: PostgresOutbox, states: Sequence[str], limit: int) -> list[Row]:
    """The first ``limit`` rows in ``states``, oldest first."""
    async with await outbox.connect() as connection:
        cursor = await connection.execute(
            outbox.statements.listing, {"states": list(states), "limit": limit}
        )
        return [Row(*row) for row in await cursor.fetchall()]


async def retry(outbox: PostgresOutbox, ids: Sequence[int] | None = None) -> int:
    """Make parked rows (``ids``, or all) pending again with fresh attempts; how many."""
    async with await outbox.connect() as connection:
        cursor = await connection.execute(
            outbox.statements.retry, {"ids": None if ids is None else list(ids)}
        )
        return int(cursor.rowcount)


async def purge(
    outbox: PostgresOutbox, states: Sequence[str], ids: Sequence[int] | None = None
) -> int:
    """Delete the rows in ``states`` (``ids``, or all of them); how many."""
    async with await outbox.connect() as connection:
        cursor = await connection.execute(
            outbox.statements.purge,
            {"states": list(states), "ids": None if ids is None else list(ids)},
        )
        return int(cursor.rowcount)


async def stats(outbox: PostgresOutbox) -> Stats:
    """Pending rows, the age of the oldest, and parked rows."""
    async with await outbox.connect() as connection:
        return await Claims(connection, outbox.statements).stats()
