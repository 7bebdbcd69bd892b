"""Idempotent consumers: each ``message_id`` handled once per queue, across redeliveries.

``App(idempotency=RedisStore(...))`` and ``@app.consumer(queue, idempotent=True)`` (or
``idempotent = true`` on the queue in ``topology.toml``). Stores share the
:class:`IdempotencyStore` protocol; implement it for another database.
"""

from rabbitflow.idempotency._guard import SKIPPED, Guard, InProgress
from rabbitflow.idempotency._memory import MemoryStore
from rabbitflow.idempotency._postgres_store import PostgresStore
from rabbitflow.idempotency._redis_store import RedisStore
from rabbitflow.idempotency._store import ClaimResult, ClaimState, IdempotencyStore

__all__ = [
    "SKIPPED",
    "ClaimResult",
    "ClaimState",
    "Guard",
    "IdempotencyStore",
    "InProgress",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
]
