"""Where a workflow's state and a chord's barrier are kept: the app's jobs store.

:class:`FlowStore` is one protocol over the stores of section 8 (``MemoryStore``,
``RedisStore``, ``PostgresStore``): :func:`store_of` picks the implementation for the store
given as ``App(jobs=...)``, once per app. Every call is one round trip.

The barrier is idempotent per member: :meth:`FlowStore.record` keeps the first result of a
member and ignores the later ones (a redelivery); the member whose record completes the set
becomes the *claimant*, the only one told to publish the callback, and it is told so again
on every redelivery until :meth:`FlowStore.published` says the callback is confirmed. A
claimant that dies between the callback's confirm and that write is redelivered and
publishes it again, with the same message id (see docs/workflows.md).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Protocol

from rabbitflow.errors import WorkflowError
from rabbitflow.workflows._record import FlowRecord

if TYPE_CHECKING:
    from rabbitflow.app import App


class FlowStore(Protocol):
    """A workflow's state and its chord's barrier."""

    async def create(self, record: FlowRecord, ttl_ms: int) -> None:
        """A new workflow, before its first message is published."""
        ...

    async def record(self, flow: str, member: int, result: bytes) -> int:
        """Member ``member`` succeeded with ``result`` (JSON): ``CLAIM`` when this member
        publishes the callback, ``WAIT`` otherwise, ``UNKNOWN`` for a workflow it does not
        know. Idempotent: the first result of a member is kept."""
        ...

    async def results(self, flow: str) -> list[bytes]:
        """Every member's result (JSON), in member order."""
        ...

    async def published(self, flow: str, finished: bool) -> None:
        """The chord's callback is confirmed by the broker (``finished``: there is none, the
        workflow succeeded)."""
        ...

    async def step_done(self, flow: str, label: str, result: bytes | None) -> None:
        """Step ``label`` succeeded; ``result`` is given for the last step: the workflow
        succeeded with it."""
        ...

    async def fail(self, flow: str, label: str, error: str) -> None:
        """Step ``label`` is in the DLQ: the workflow failed."""
        ...

    async def cancel(self, flow: str) -> bool:
        """Stop publishing the workflow's next steps; False when unknown."""
        ...

    async def is_cancelled(self, flow: str) -> bool: ...

    async def get(self, flow: str) -> FlowRecord | None: ...


_stores: weakref.WeakKeyDictionary[App, FlowStore] = weakref.WeakKeyDictionary()
_memory: dict[int, tuple[object, FlowStore]] = {}


def jobs_store(app: App) -> object | None:
    """The store given as ``App(jobs=...)``, if any."""
    return getattr(app, "_jobs_store", None)


def store_of(app: App, *, required: str | None = None) -> FlowStore | None:
    """The flow store of ``app`` (its jobs store), built once; None without one, unless
    ``required`` names what needs it (then a :class:`WorkflowError`)."""
    found = _stores.get(app)
    if found is not None:
        return found
    backing = jobs_store(app)
    if backing is None:
        if required:
            raise WorkflowError(
                f"{required} needs the jobs store: App(..., jobs=RedisStore(...)) "
                "(or PostgresStore, MemoryStore)"
            )
        return None
    found = _build(backing)
    _stores[app] = found
    book = app.jobs
    if hasattr(book, "steps_of"):
        # app.jobs.get(flow.id) gives each step's state too.
        book.steps_of = _steps_reader(found)
    return found


def _steps_reader(store: FlowStore) -> Any:
    async def steps(job_id: str) -> list[dict[str, Any]] | None:
        record = await store.get(job_id)
        return None if record is None else record.step_states()

    return steps


def _build(backing: Any) -> FlowStore:
    from rabbitflow.idempotency import MemoryStore, PostgresStore, RedisStore

    if isinstance(backing, MemoryStore):
        from rabbitflow.workflows._memory import MemoryFlows

        # Every app of the process on the same MemoryStore sees the same workflows.
        return _memory.setdefault(id(backing), (backing, MemoryFlows()))[1]
    if isinstance(backing, RedisStore):
        from rabbitflow.workflows._redis import RedisFlows

        # On the store's own client, as its job book is: closed with the store.
        return RedisFlows(backing._client, backing.timeout, f"{backing.prefix}flow:", backing.url)
    if isinstance(backing, PostgresStore):
        from rabbitflow.workflows._postgres import PostgresFlows

        # On the store's own pool (opened on first use), as its job book is.
        return PostgresFlows(backing._prepared, backing.timeout, backing.table, backing.url)
    raise WorkflowError(
        f"workflows keep their state in the jobs store, and {type(backing).__name__} is not "
        "one rabbitflow knows: MemoryStore, RedisStore or PostgresStore"
    )
