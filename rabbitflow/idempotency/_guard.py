"""``Guard``: the idempotency check around one consumer's handler.

For each delivery with a ``message_id``: a key already done is skipped (the dispatcher acks
it without running the handler); a key claimed by a live lease elsewhere raises
:class:`InProgress`, a retry no earlier than the rest of that lease; otherwise the handler
runs under a fresh claim, which becomes done when it returns and is released when it fails.
A delivery without a ``message_id`` runs unguarded and is counted.

The guard is the border between rabbitflow and a store a user implemented: such a store's
calls are bounded by :data:`~rabbitflow.idempotency._store.DEFAULT_TIMEOUT` and whatever
they raise becomes :class:`~rabbitflow.errors.StoreUnavailableError` (rabbitflow's own
stores do both themselves). That error defers the message without spending an attempt and
pauses the consumers that need the store (``rabbitflow._breaker.Dependency``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiormq.abc import DeliveredMessage

from rabbitflow._logging import get_logger
from rabbitflow._metrics import Value
from rabbitflow._tracking import SKIPPED as SKIPPED  # re-exported: the dispatcher reads it here
from rabbitflow.errors import Retry, StoreUnavailableError
from rabbitflow.idempotency._memory import MemoryStore
from rabbitflow.idempotency._postgres_store import PostgresStore
from rabbitflow.idempotency._redis_store import RedisStore
from rabbitflow.idempotency._store import (
    DEFAULT_TIMEOUT,
    ClaimResult,
    ClaimState,
    IdempotencyStore,
    bounded,
    timeout_seconds,
)

log = get_logger("rabbitflow.idempotency")

# Calls a guard owes a store that did not answer, and how many it remembers.
RELEASE = "release"
COMPLETE = "complete"
OWED_MEMORY = 10_000

# How the dispatcher calls the handler for one delivery on a given attempt.
Invoke = Callable[[DeliveredMessage, int], Awaitable[Any]]


class InProgress(Retry):
    """Another consumer is handling this message now; retried once its lease is over.

    The wait is deferred, not retried: it spends no attempt of the message."""

    spends_attempt = False

    def __init__(self, queue: str, message_id: str, retry_after_ms: int) -> None:
        self.queue = queue
        self.message_id = message_id
        self.retry_after_ms = retry_after_ms
        super().__init__(
            delay=max(retry_after_ms, 1),
            reason=f"message {message_id!r} of queue {queue!r} is being handled elsewhere",
        )


class Guard:
    """Claims each message of ``queue`` in ``store`` around the handler.

    ``skipped`` and ``unkeyed`` count the duplicates acked without running and the deliveries
    without a ``message_id`` (run unguarded); pass metric children to export them."""

    __slots__ = ("_calls", "_owed", "lease_ms", "queue", "skipped", "store", "ttl_ms", "unkeyed")

    def __init__(
        self,
        queue: str,
        store: IdempotencyStore,
        *,
        skipped: Value | None = None,
        unkeyed: Value | None = None,
    ) -> None:
        self.queue = queue
        self.store = store
        # rabbitflow's own stores bound their calls and convert their errors; another is
        # bounded and converted here, once chosen.
        self._calls: IdempotencyStore = store if _owned(store) else _Bordered(store)
        # Calls the store did not answer, made good once it answers again (see probe):
        # key -> (owner, RELEASE or COMPLETE). Bounded; empty in normal operation.
        self._owed: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.lease_ms = store.lease_ms
        self.ttl_ms = store.ttl_ms
        self.skipped = skipped or Value()
        self.unkeyed = unkeyed or Value()

    def wrap(self, invoke: Invoke) -> Invoke:
        """``invoke`` guarded: returns :data:`SKIPPED` instead of running a done message."""

        async def guarded(delivery: DeliveredMessage, attempt: int) -> Any:
            message_id = delivery.header.properties.message_id
            if not message_id:
                self._unkeyed()
                return await invoke(delivery, attempt)
            key = f"{self.queue}:{message_id}"
            owner = uuid.uuid4().hex
            try:
                found = await self._calls.claim(key, owner, self.lease_ms)
            except StoreUnavailableError:
                # The claim may have been taken before the answer was lost: left alone, it
                # would hold this message back for a whole lease when it comes again.
                self._owe(key, owner, RELEASE)
                raise
            if found.state is ClaimState.DONE:
                self.skipped.value += 1
                log.info(
                    "duplicate skipped: already handled", queue=self.queue, message_id=message_id
                )
                return SKIPPED
            if found.state is ClaimState.BUSY:
                raise InProgress(self.queue, message_id, found.retry_after_ms)
            try:
                result = await invoke(delivery, attempt)
            except BaseException:
                await self._release(key, owner)
                raise
            await self._complete(key, owner)
            return result

        return guarded

    async def probe(self) -> None:
        """One call to the store, then the calls it did not answer made good (a claim that
        may have been taken is released, a handled message is marked done); raises
        StoreUnavailableError unless all of that answered. A store without ``ping()`` is
        asked to release a key nobody holds (a no-op by protocol)."""
        ping = getattr(self.store, "ping", None)
        if callable(ping) and _owned(self.store):
            await ping()
        else:
            await self._calls.release(f"{self.queue}:rabbitflow-probe", "rabbitflow-probe")
        while self._owed:
            key, (owner, call) = next(iter(self._owed.items()))
            if call == COMPLETE:
                await self._calls.complete(key, owner, self.ttl_ms)
            else:
                await self._calls.release(key, owner)
            if self._owed.get(key) == (owner, call):
                del self._owed[key]

    def _owe(self, key: str, owner: str, call: str) -> None:
        self._owed[key] = (owner, call)
        self._owed.move_to_end(key)
        while len(self._owed) > OWED_MEMORY:
            self._owed.popitem(last=False)  # the oldest expires with its lease instead

    def _unkeyed(self) -> None:
        self.unkeyed.value += 1
        count = int(self.unkeyed.value)
        if count == 1 or count % 1000 == 0:
            log.warning(
                "delivery without message_id on an idempotent queue: handled without the check",
                queue=self.queue,
                count=count,
            )

    async def _release(self, key: str, owner: str) -> None:
        # Failed or cancelled: free the key so that the retry (or the redelivery after a
        # shutdown) runs at once instead of waiting for the lease to run out.
        try:
            await asyncio.shield(self._calls.release(key, owner))
        except Exception as exc:
            self._owe(key, owner, RELEASE)
            log.warning(
                "could not release an idempotency claim; released once the store answers",
                queue=self.queue,
                key=key,
                error=str(exc),
            )

    async def _complete(self, key: str, owner: str) -> None:
        try:
            await self._calls.complete(key, owner, self.ttl_ms)
        except Exception as exc:
            # The handler's work is done: the message is acked all the same, and marked
            # done once the store answers (meanwhile its claim keeps duplicates waiting).
            self._owe(key, owner, COMPLETE)
            log.warning(
                "could not mark a message done in the idempotency store; marked once it answers",
                queue=self.queue,
                key=key,
                error=str(exc),
            )


def _owned(store: IdempotencyStore) -> bool:
    return isinstance(store, RedisStore | PostgresStore | MemoryStore)


class _Bordered:
    """A store a user implemented, as the guard calls it: each call within the store's
    ``timeout`` attribute (a duration, or seconds as a float) if it has one, else the
    default deadline; any failure raised as StoreUnavailableError naming the store."""

    __slots__ = ("_store", "_timeout", "lease_ms", "ttl_ms")

    def __init__(self, store: IdempotencyStore) -> None:
        self._store = store
        timeout = getattr(store, "timeout", None)
        self._timeout = timeout_seconds(timeout if timeout is not None else DEFAULT_TIMEOUT)
        self.lease_ms = store.lease_ms
        self.ttl_ms = store.ttl_ms

    async def claim(self, key: str, owner: str, lease_ms: int) -> ClaimResult:
        call = self._store.claim(key, owner, lease_ms)
        return await bounded(self._store, "claim", self._timeout, call, (Exception,))

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        call = self._store.complete(key, owner, ttl_ms)
        await bounded(self._store, "complete", self._timeout, call, (Exception,))

    async def release(self, key: str, owner: str) -> None:
        call = self._store.release(key, owner)
        await bounded(self._store, "release", self._timeout, call, (Exception,))

    async def close(self) -> None:
        await self._store.close()
