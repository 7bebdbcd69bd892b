"""A started workflow: its id, its status, its cancellation."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from rabbitflow.workflows import _jobs as jobs
from rabbitflow.workflows._record import FlowRecord
from rabbitflow.workflows._store import store_of

if TYPE_CHECKING:
    from rabbitflow.app import App


class StepStatus(BaseModel):
    """One step of a workflow: ``step`` is its label (``s0`` the first step of a chain,
    ``m3`` the fourth member of a chord, ``c0`` the chord's callback), ``queue`` its
    consumer's queue, ``state`` ``pending``, ``succeeded``, ``failed`` or ``cancelled``."""

    model_config = ConfigDict(frozen=True)

    step: str
    queue: str
    state: str
    error: str | None = None


class FlowStatus(BaseModel):
    """A workflow's state as its store knows it: ``running``, ``succeeded``, ``failed``
    (``failed_step`` names the step in the DLQ, ``error`` its error) or ``cancelled``;
    ``result`` the last step's return value (JSON text); ``steps`` each step's state."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: str
    state: str
    steps: list[StepStatus]
    failed_step: str | None = None
    error: str | None = None
    result: Any = None
    created_at: datetime | None = None
    finished_at: datetime | None = None


class Flow:
    """A started workflow (``app.start()``); ``id`` names it everywhere (the message ids of
    its steps start with it)."""

    __slots__ = ("_app", "id")

    def __init__(self, app: App, flow_id: str) -> None:
        self._app = app
        self.id = flow_id

    async def status(self) -> FlowStatus | None:
        """Its state and each step's (needs the jobs store); None when unknown/expired."""
        store = store_of(self._app, required="a workflow's status")
        assert store is not None
        record = await store.get(self.id)
        return None if record is None else describe(record)

    async def cancel(self) -> bool:
        """Publish none of its steps from now on (a step already published still runs);
        False when the store does not know it."""
        store = store_of(self._app, required="cancelling a workflow")
        assert store is not None
        known = await store.cancel(self.id)
        if known:
            jobs.cancelled(self._app, self.id)
        return known

    def __repr__(self) -> str:
        return f"<Flow {self.id!r}>"


def describe(record: FlowRecord) -> FlowStatus:
    """The public status of a stored workflow."""
    steps = [StepStatus(**step) for step in record.step_states()]
    return FlowStatus(
        id=record.id,
        kind=record.kind,
        state=record.state,
        steps=steps,
        failed_step=_named(record),
        error=record.error,
        result=record.result,
        created_at=_when(record.created_at),
        finished_at=_when(record.finished_at),
    )


def _named(record: FlowRecord) -> str | None:
    if record.failed is None:
        return None
    queue = dict(record.steps).get(record.failed, "?")
    return f"{record.failed} ({queue})"


def _when(epoch: float | None) -> datetime | None:
    return None if not epoch else datetime.fromtimestamp(epoch, UTC)
