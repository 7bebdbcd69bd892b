"""The background writer of job changes: off the ack path, batched, patient with outages.

The tracker hands each change over without waiting (:meth:`Writer.put`); one task writes
whatever has gathered in one round trip (a Redis pipeline, one PostgreSQL transaction in
pipeline mode), so that the store sees a few large writes instead of one per change, and a
slow write delays only later status updates. When the store does not answer, the changes
wait here, in order, and are written once it answers again: the messages are handled and
acked meanwhile, their statuses are only late. Memory is bounded: past
:data:`MAX_PENDING` the oldest changes are dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from rabbitflow._backoff import full_jitter
from rabbitflow._logging import get_logger
from rabbitflow.jobs._change import Change, coalesce

log = get_logger("rabbitflow.jobs")

MAX_PENDING = 100_000
BATCH = 1000
# How long the writer lets changes gather once one is there (unless a batch is full): at
# 10,000 messages/s a batch then carries ~100 changes, mostly a job's start and end merged,
# instead of one round trip per change; a status is that much later, no message waits.
LINGER = 0.005
# Between writes the store did not take: full jitter from BACKOFF_BASE up to BACKOFF_CAP.
BACKOFF_BASE = 0.25
BACKOFF_CAP = 5.0

Apply = Callable[[Sequence[Change]], Awaitable[None]]


class Writer:
    """Writes changes with ``apply`` (one round trip per call, bounded by ``timeout``)."""

    __slots__ = ("_apply", "_idle", "_pending", "_task", "_timeout", "_wake", "dropped", "name")

    def __init__(self, apply: Apply, timeout: float, name: str) -> None:
        self._apply = apply
        self._timeout = timeout
        self.name = name
        self._pending: deque[Change] = deque()
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Changes not written yet."""
        return len(self._pending)

    def put(self, change: Change) -> None:
        """Write ``change`` soon; returns at once."""
        pending = self._pending
        pending.append(change)
        if len(pending) > MAX_PENDING:
            pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error(
                    "job status changes dropped: the store has not answered for too long",
                    store=self.name,
                    dropped=self.dropped,
                )
        task = self._task
        # A writer of another event loop (one that ended: a test's) cannot run in this one.
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._start()
        assert self._wake is not None
        assert self._idle is not None
        self._idle.clear()
        self._wake.set()

    def _start(self) -> None:
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        # A context of its own: the delivery whose change started it is not the writer's.
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), context=contextvars.Context())

    async def _run(self) -> None:
        assert self._wake is not None
        assert self._idle is not None
        failures = 0
        pending = self._pending
        while True:
            await self._wake.wait()
            if len(pending) < BATCH:
                await asyncio.sleep(LINGER)
            self._wake.clear()
            while pending:
                batch = [pending.popleft() for _ in range(min(BATCH, len(pending)))]
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._apply(coalesce(batch))
                except Exception as exc:
                    pending.extendleft(reversed(batch))
                    failures += 1
                    if failures == 1:
                        log.warning(
                            "job store unavailable: status updates wait until it answers",
                            store=self.name,
                            pending=len(pending),
                            error=str(exc) or type(exc).__name__,
                        )
                    await asyncio.sleep(full_jitter(failures, BACKOFF_BASE, BACKOFF_CAP))
                    continue
                if failures:
                    log.info("job store answers again; status updates written", store=self.name)
                    failures = 0
            self._idle.set()

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every pending change to be written; whether
        they were."""
        if not self._pending or self._idle is None:
            return not self._pending
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float) -> None:
        """Flush (up to ``timeout``), then stop; changes still pending are reported."""
        if not await self.flush(timeout):
            log.warning(
                "job status changes not written at shutdown: the store did not answer",
                store=self.name,
                pending=len(self._pending),
            )
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
