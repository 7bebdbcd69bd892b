"""The delivery path's one hook for job status: a :class:`Tracker` per tracked consumer.

The dispatcher knows nothing of jobs. For a consumer with ``track``, it wraps the handler's
call with :meth:`Tracker.wrap` once, when it is built (like the idempotency guard), and tells
the tracker each settled plan with :meth:`Tracker.settled`. Both return at once: status
writes happen in the background, never on the ack path. The implementation is
:mod:`rabbitflow.jobs`; fates stay decided in :mod:`rabbitflow._outcome`.

:data:`CURRENT` is the job of the delivery a tracked handler runs for, which
``message.progress()`` and ``message.cancelled`` read.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiormq.abc import DeliveredMessage

if TYPE_CHECKING:
    from rabbitflow._outcome import Action, Plan


class _Skipped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED: Final = _Skipped()
"""What a wrapped call returns for a message that is not run (handled before, or its job
cancelled): ack it, reply nothing."""

# How the dispatcher calls the handler for one delivery on a given attempt.
Invoke = Callable[[DeliveredMessage, int], Awaitable[Any]]


class Tracker(Protocol):
    """Records the job transitions of one queue's deliveries."""

    def wrap(self, invoke: Invoke) -> Invoke:
        """``invoke`` tracked: ``running`` before it, the result after it. A cancelled job
        is not run: the wrapped call returns the idempotency guard's ``SKIPPED`` (acked,
        no reply)."""
        ...

    def settled(self, delivery: DeliveredMessage, plan: Plan, action: Action) -> None:
        """The delivery was settled as ``action`` for ``plan``: ``retrying``, ``failed``."""
        ...


class RunningJob(Protocol):
    """The job a tracked handler runs for, as its :class:`~rabbitflow.Message` sees it."""

    job_id: str

    @property
    def cancelled(self) -> bool: ...

    def progress(self, fraction: float, note: str | None) -> None: ...


CURRENT: contextvars.ContextVar[RunningJob | None] = contextvars.ContextVar(
    "rabbitflow_job", default=None
)
