"""The delivery path's hook for workflows: what runs after a workflow step's handler.

The core knows no workflow. A delivery that carries ``rabbitflow-workflow`` (the routing slip
of :mod:`rabbitflow.workflows`) is handed, after its handler returned and before it is acked,
to the installed :class:`Steps` (``succeeded``: publish the next step and wait for its
confirm, or record a chord member); after its DLQ copy is confirmed, to ``dead_lettered``
(the workflow fails, naming the step). :mod:`rabbitflow.workflows` installs itself when it
is imported (``rabbitflow run`` and ``from rabbitflow import chain`` import it).

``App.start`` takes anything :class:`Startable`: the workflow starts itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from aiormq.abc import DeliveredMessage

from rabbitflow import _headers as h
from rabbitflow._logging import get_logger
from rabbitflow.errors import ConfigurationError

if TYPE_CHECKING:
    from rabbitflow._publisher import Publisher
    from rabbitflow.app import App


class Steps(Protocol):
    """What happens around a workflow step's delivery (installed by rabbitflow.workflows)."""

    async def succeeded(
        self, app: App, publisher: Publisher, delivery: DeliveredMessage, result: object
    ) -> None:
        """The step's handler returned ``result``: carry the workflow on. Raising makes the
        delivery a failure of the step (retried like one); nothing is acked before this
        returns."""
        ...

    async def dead_lettered(
        self, app: App, delivery: DeliveredMessage, error: BaseException
    ) -> None:
        """The step's DLQ copy is confirmed: the workflow failed at this step."""
        ...


class Startable(Protocol):
    """A workflow that ``app.start()`` can start (``chain``, ``group``, ``chord``, ``step``)."""

    async def start(self, app: App) -> Any:
        """Publish the workflow's first steps; the handle of the started workflow."""
        ...


log = get_logger("rabbitflow.workflows")

_installed: Steps | None = None


def install(steps: Steps) -> None:
    """Make ``steps`` carry every workflow delivery on (rabbitflow.workflows on import)."""
    global _installed
    _installed = steps


def is_step(delivery: DeliveredMessage) -> bool:
    """Whether the delivery is a step of a workflow (one dict lookup)."""
    headers = delivery.header.properties.headers
    return bool(headers) and h.WORKFLOW in headers  # type: ignore[operator]


class Continuer:
    """The hook of one consumer: calls the installed :class:`Steps` for workflow steps."""

    __slots__ = ("app", "publisher")

    def __init__(self, app: App, publisher: Publisher) -> None:
        self.app = app
        self.publisher = publisher

    async def succeeded(self, delivery: DeliveredMessage, result: object) -> None:
        await _steps().succeeded(self.app, self.publisher, delivery, result)

    async def dead_lettered(self, delivery: DeliveredMessage, error: BaseException) -> None:
        # After the ack: nothing here may fail the delivery, which is settled already.
        if _installed is None:
            return
        try:
            await _installed.dead_lettered(self.app, delivery, error)
        except Exception as exc:
            log.error(
                "workflow not marked failed",
                message_id=delivery.header.properties.message_id,
                error=f"{type(exc).__name__}: {exc}",
            )


def _steps() -> Steps:
    if _installed is None:
        # A worker started without `rabbitflow run` (an embedded Worker) that never imported
        # rabbitflow.workflows: the step fails loudly rather than end its workflow unseen.
        raise ConfigurationError(
            "this message is a workflow step, but rabbitflow.workflows is not loaded in "
            "this process: import rabbitflow.workflows in the app's module"
        )
    return _installed
