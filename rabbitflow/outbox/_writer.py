"""Writing a row on the caller's connection, in the caller's transaction.

Two kinds of connection are taken, the two ways Python services talk to PostgreSQL: a
psycopg 3 ``AsyncConnection`` and a SQLAlchemy 2 ``AsyncSession`` (or ``AsyncConnection``),
told apart once per call by the object's module. The insert is one statement, one round trip;
what happens to it is the transaction's business: committed, the relay publishes it; rolled
back, it never existed.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from rabbitflow.errors import ConfigurationError
from rabbitflow.outbox._row import OutboxMessage
from rabbitflow.outbox._schema import Statements, sqlalchemy_form


async def write(connection: Any, statements: Statements, message: OutboxMessage) -> None:
    """Insert ``message`` through ``connection`` (psycopg or SQLAlchemy, async)."""
    sql = statements.insert if message.key is None else statements.insert_keyed
    module = type(connection).__module__
    if module.startswith("sqlalchemy"):
        await connection.execute(_text(sqlalchemy_form(sql)), message.params())
    elif module.startswith("psycopg") and hasattr(connection, "cursor"):
        if not _is_async(connection):
            raise ConfigurationError(_WRONG_KIND.format(kind=type(connection).__name__))
        await connection.execute(sql, message.params())
    else:
        raise ConfigurationError(_WRONG_KIND.format(kind=type(connection).__qualname__))


_WRONG_KIND = (
    "app.outbox.publish() writes on a psycopg 3 AsyncConnection or a SQLAlchemy 2 "
    "AsyncSession / AsyncConnection, in the caller's transaction; got a {kind}"
)


def _is_async(connection: Any) -> bool:
    import psycopg

    return isinstance(connection, psycopg.AsyncConnection)


@cache
def _text(sql: str) -> Any:
    # SQLAlchemy is the user's: imported only when a session is given, each statement once.
    from sqlalchemy import text

    return text(sql)
