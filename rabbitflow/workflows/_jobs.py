"""A workflow is a job (contract section 14): its lifecycle recorded in ``app.jobs``.

``app.jobs.get(flow.id)`` then gives its state (``queued`` → ``running`` → ``succeeded`` |
``failed`` | ``cancelled``), the error naming the failed step, the last step's result and each
step's state (``steps``, read from the flow store); ``app.job(flow.id).result()`` waits for
it. The changes are written in the background, like a tracked job's: never on the ack path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbitflow import _clock as clock
from rabbitflow.jobs import Change
from rabbitflow.jobs import _change as c

if TYPE_CHECKING:
    from rabbitflow.app import App


async def started(app: App, flow: str) -> None:
    """The workflow's first messages are about to be published: it is ``running`` from now,
    written before they are, so that no step can finish while its workflow reads ``queued``."""
    now = clock.now()
    queued, running = Change(flow, c.QUEUED, now), Change(flow, c.RUNNING, now, attempt=1)
    await app.jobs.write(queued, running)  # type: ignore[attr-defined]


def succeeded(app: App, flow: str, result: bytes | None) -> None:
    text = None if result is None else result.decode()
    app.jobs.record(Change(flow, c.SUCCEEDED, clock.now(), attempt=1, result=text))  # type: ignore[attr-defined]


def failed(app: App, flow: str, step: str, error: str, error_type: str) -> None:
    app.jobs.record(  # type: ignore[attr-defined]
        Change(
            flow,
            c.FAILED,
            clock.now(),
            attempt=1,
            error=f"step {step}: {error}",
            error_type=error_type,
        )
    )


def cancelled(app: App, flow: str) -> None:
    app.jobs.record(Change(flow, c.CANCELLED, clock.now()))  # type: ignore[attr-defined]


def resumed(app: App, flow: str) -> None:
    """A replayed step ran again: a failed workflow is running again."""
    now = clock.now()
    app.jobs.record(Change(flow, c.REPLAYED, now))  # type: ignore[attr-defined]
    app.jobs.record(Change(flow, c.RUNNING, now, attempt=1))  # type: ignore[attr-defined]
