"""``Book``: ``app.jobs`` on one store (the core's :class:`~rabbitflow.job.JobBook`).

A :class:`Backend` is what each store provides: apply a batch of changes in one round trip,
read a record, request a cancellation, wait for a job to finish on the store's own
notifications (Redis pub/sub, PostgreSQL ``LISTEN``, an in-process future), and tell the
worker about cancellations. The book adds what is common: the background writer, the
worker's set of cancelled jobs, the result size limit and the call deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from rabbitflow import _clock as clock
from rabbitflow._backoff import full_jitter
from rabbitflow._logging import get_logger
from rabbitflow.errors import StoreUnavailableError
from rabbitflow.idempotency._store import NETWORK_ERRORS
from rabbitflow.job import JobStatus
from rabbitflow.jobs import _change as c
from rabbitflow.jobs._tracker import JobTracker
from rabbitflow.jobs._writer import Writer

log = get_logger("rabbitflow.jobs")

T = TypeVar("T")

# The largest result kept, as JSON: larger ones are refused (JobResultError), not cut.
MAX_RESULT_BYTES = 1024 * 1024
# Cancelled job ids a worker remembers (the oldest are forgotten first).
CANCELS_KEPT = 100_000
# How long a shutdown waits for pending status changes to be written.
CLOSE_TIMEOUT = 5.0

OnCancel = Callable[[str], None]


class Backend(Protocol):
    """The store side of a book; records are dicts as :func:`rabbitflow.jobs._change.apply`
    makes them (times as epoch seconds, the result as JSON text)."""

    name: str
    timeout: float

    async def apply(self, changes: Sequence[c.Change]) -> None:
        """Apply ``changes`` in order, by the rules of :mod:`rabbitflow.jobs._change`;
        notify the waiters of the jobs they finish."""
        ...

    async def read(self, job_id: str) -> dict[str, Any] | None: ...

    async def request_cancel(self, job_id: str, at: float) -> dict[str, Any] | None:
        """Cancel a queued/retrying job, flag a running one, tell the workers; the record
        after it (None when unknown)."""
        ...

    async def wait_finished(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """The record once finished, or as it is at ``timeout``."""
        ...

    async def recent_cancels(self) -> list[str]:
        """The jobs cancelled within the ttl (a worker's start, or after an outage)."""
        ...

    async def listen_cancels(self, on_cancel: OnCancel) -> None:
        """Call ``on_cancel`` for each cancellation from now on; returns or raises only
        when the connection is lost."""
        ...

    async def close(self) -> None: ...


class Book:
    """Job statuses in one store, for clients (``get``, ``wait``, ``cancel``) and workers
    (``tracker``). ``ttl_ms`` is how long a job is kept after its last change;
    ``max_result_bytes`` the largest result kept (as JSON)."""

    __slots__ = (
        "_backend",
        "_cancels",
        "_owned",
        "_watcher",
        "_writer",
        "max_result_bytes",
        "steps_of",
        "ttl_ms",
    )

    def __init__(
        self,
        backend: Backend,
        ttl_ms: int,
        *,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ) -> None:
        if max_result_bytes <= 0:
            raise ValueError(f"max_result_bytes must be positive, not {max_result_bytes!r}")
        self._backend = backend
        self.ttl_ms = ttl_ms
        self.max_result_bytes = max_result_bytes
        self._writer = Writer(backend.apply, backend.timeout, backend.name)
        self._cancels: OrderedDict[str, None] = OrderedDict()
        self._watcher: asyncio.Task[None] | None = None
        self._owned: Any = None  # a store opened for this book alone, closed with it
        # The steps of a workflow (rabbitflow.workflows sets it): None for any other job.
        self.steps_of: Callable[[str], Awaitable[list[dict[str, Any]] | None]] | None = None

    def own(self, store: Any) -> None:
        """Close ``store`` with this book (a store opened for the book alone)."""
        self._owned = store

    # -- the worker's side ---------------------------------------------------------------

    @property
    def cancels(self) -> OrderedDict[str, None]:
        """The job ids this process knows to be cancelled (``id in book.cancels``)."""
        return self._cancels

    def record(self, change: c.Change) -> None:
        """Write ``change`` in the background; returns at once."""
        self._writer.put(change)

    @property
    def pending(self) -> int:
        """Changes recorded but not written yet (more than a few: the store is slow or down)."""
        return self._writer.pending

    def tracker(self, queue: str) -> JobTracker:
        return JobTracker(queue, self)

    def watch_cancels(self) -> None:
        """Follow cancellations in this process (started by the first tracked delivery)."""
        task = self._watcher
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            return
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch(), context=contextvars.Context())

    def _cancelled(self, job_id: str) -> None:
        cancels = self._cancels
        cancels[job_id] = None
        cancels.move_to_end(job_id)
        while len(cancels) > CANCELS_KEPT:
            cancels.popitem(last=False)

    async def _watch(self) -> None:
        failures = 0
        while True:
            try:
                listening = asyncio.ensure_future(self._backend.listen_cancels(self._cancelled))
                try:
                    # Loaded once the listener runs: a cancellation in between is in both.
                    recent = self._backend.recent_cancels()
                    for job_id in await self._call("recent cancels", recent):
                        self._cancelled(job_id)
                    failures = 0
                    await listening
                finally:
                    listening.cancel()
                    with contextlib.suppress(BaseException):
                        await listening
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "job store unavailable: cancellations are followed once it answers",
                        store=self._backend.name,
                        error=str(exc) or type(exc).__name__,
                    )
            await asyncio.sleep(full_jitter(max(failures, 1), 0.25, 5.0))

    # -- the client's side ---------------------------------------------------------------

    async def get(self, job_id: str) -> JobStatus | None:
        record = await self._call("get", self._backend.read(job_id))
        if record is None:
            return None
        status = c.status_of(record)
        if self.steps_of is not None:
            steps = await self._call("get steps", self.steps_of(job_id))
            if steps is not None:
                status = status.model_copy(update={"steps": steps})
        return status

    async def wait(self, job_id: str, timeout: float | None) -> JobStatus | None:
        # Not bounded by the store's timeout: the wait itself is the caller's.
        try:
            record = await self._backend.wait_finished(job_id, timeout)
        except StoreUnavailableError:
            raise
        except (*NETWORK_ERRORS, *_client_errors()) as exc:
            raise StoreUnavailableError(self._backend, "wait", exc) from exc
        return None if record is None else c.status_of(record)

    async def cancel(self, job_id: str) -> JobStatus | None:
        record = await self._call("cancel", self._backend.request_cancel(job_id, clock.now()))
        if record is None:
            return None
        self._cancelled(job_id)
        return c.status_of(record)

    async def record_queued(self, job_id: str, *, queue: str | None = None) -> None:
        change = c.Change(job_id, c.QUEUED, clock.now(), queue=queue)
        await self._call("record queued", self._backend.apply([change]))

    async def write(self, *changes: c.Change) -> None:
        """Write ``changes`` in order before returning, in one round trip: for a caller's
        path (``app.start``), never a delivery's."""
        await self._call("record", self._backend.apply(list(changes)))

    async def record_replayed(self, job_id: str) -> None:
        change = c.Change(job_id, c.REPLAYED, clock.now())
        await self._call("record replayed", self._backend.apply([change]))

    async def flush(self) -> None:
        await self._writer.flush(self._backend.timeout)

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        await self._writer.close(CLOSE_TIMEOUT)
        await self._backend.close()
        if self._owned is not None:
            await self._owned.close()

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        """``call`` within the store's timeout; its failures as StoreUnavailableError."""
        deadline = asyncio.timeout(self._backend.timeout)
        try:
            async with deadline:
                return await call
        except StoreUnavailableError:
            raise
        except (*NETWORK_ERRORS, *_client_errors()) as exc:
            cause: BaseException = exc
            if deadline.expired():
                cause = TimeoutError(f"no answer within {self._backend.timeout:g}s")
            raise StoreUnavailableError(self._backend, operation, cause) from exc

    def __repr__(self) -> str:
        return f"<jobs in {self._backend.name}>"


@functools.cache
def _client_errors() -> tuple[type[BaseException], ...]:
    """The client libraries' own errors, for those installed."""
    found: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from redis.exceptions import RedisError

        found.append(RedisError)
    with contextlib.suppress(ImportError):
        from psycopg import Error

        found.append(Error)
    return tuple(found)
