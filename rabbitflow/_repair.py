"""Declaring a queue's retry tiers, DLX and DLQ again when a copy finds them missing.

An operator may delete a tier or a DLQ while workers run (or a policy may make a queue refuse
messages). A retry or dead-letter copy is then returned unroutable, or the broker closes the
publishing channel with 404 when the exchange is gone. The worker declares that queue's
derived objects again, once per interval, and the settler publishes the copy again. A worker
that may not declare (``--no-declare``, no configure permission) says what is missing and
what to run instead; the original message stays in its queue meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aio_pika.abc import AbstractConnection
from aiormq.exceptions import AMQPError

from rabbitflow._logging import get_logger
from rabbitflow.errors import PublishError, RabbitflowError
from rabbitflow.topology._declare import declare
from rabbitflow.topology._derived import Declarations, derived_for

log = get_logger("rabbitflow.repair")

# Within this time of a repair of a queue, another failure does not repair it again: the
# copy is published again at once if the repair worked, else the message backs off.
REPAIR_INTERVAL = 30.0
REPAIR_TIMEOUT = 10.0


class Repairer:
    """Declares the derived objects of one queue at a time, at most once per interval."""

    __slots__ = ("_connection", "_declarations", "_last", "_locks", "may_declare")

    def __init__(
        self,
        connection: Callable[[], AbstractConnection | None],
        declarations: Declarations,
        *,
        may_declare: bool,
    ) -> None:
        self._connection = connection
        self._declarations = declarations
        self.may_declare = may_declare
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, tuple[float, bool]] = {}

    async def repair(
        self, queue: str, exchange: str, routing_key: str, error: PublishError
    ) -> bool:
        """Declare ``queue``'s tiers, DLX and DLQ again; whether publishing again may work."""
        lock = self._locks.setdefault(queue, asyncio.Lock())
        async with lock:
            last = self._last.get(queue)
            now = time.monotonic()
            if last is not None and now - last[0] < REPAIR_INTERVAL:
                return last[1]
            repaired = await self._declare(queue, exchange, routing_key, error)
            self._last[queue] = (time.monotonic(), repaired)
            return repaired

    async def _declare(
        self, queue: str, exchange: str, routing_key: str, error: PublishError
    ) -> bool:
        missing = _missing(exchange, routing_key)
        if not self.may_declare:
            log.error(
                f"{missing} is missing on the broker and this worker does not declare "
                "(--no-declare): run `rabbitflow topology declare`; failed messages stay in "
                "their queue until then",
                queue=queue,
                error=error.reason,
            )
            return False
        connection = self._connection()
        if connection is None or connection.is_closed:
            return False
        log.error(
            f"{missing} is missing on the broker (deleted while the worker ran?); "
            "declaring the queue's retry tiers, dead-letter exchange and DLQ again",
            queue=queue,
            error=error.reason,
        )
        try:
            async with asyncio.timeout(REPAIR_TIMEOUT):
                await declare(connection, derived_for(self._declarations, queue))
        except (RabbitflowError, TimeoutError, AMQPError, ConnectionError, RuntimeError) as exc:
            log.error(
                "could not declare them: run `rabbitflow topology declare` with a user that "
                "may configure these queues",
                queue=queue,
                error=str(exc) or type(exc).__name__,
            )
            return False
        return True


def _missing(exchange: str, routing_key: str) -> str:
    if exchange:
        return f"the dead-letter exchange {exchange!r} or the DLQ bound to it for {routing_key!r}"
    return f"retry tier {routing_key!r}"
