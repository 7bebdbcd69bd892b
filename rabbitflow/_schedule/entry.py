"""One registered schedule and what one of its ticks publishes."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rabbitflow._publisher import Publisher
from rabbitflow._schedule.timing import Timing

SCHEDULE_HEADER = "rabbitflow-schedule"
SCHEDULED_AT_HEADER = "rabbitflow-scheduled-at"


@dataclass(frozen=True, slots=True)
class Schedule:
    """``func`` runs on every tick of ``timing``; what it returns goes to ``exchange``.

    ``name`` identifies the schedule across processes (its lease and its last tick are kept
    on the broker under it): the function's module and qualified name unless given."""

    name: str
    timing: Timing
    func: Callable[[], Any]
    exchange: str
    routing_key: str
    headers: dict[str, Any] = field(default_factory=dict)

    def tick_id(self, at: datetime) -> str:
        """The ``message_id`` of the tick due at ``at``: the same in every process."""
        return f"{self.name}@{_iso(at)}"

    async def produce(self) -> object:
        """Run the function (a sync one in a thread) and return what it returned."""
        if inspect.iscoroutinefunction(self.func):
            return await self.func()
        result = await asyncio.to_thread(self.func)
        if inspect.isawaitable(result):
            return await result
        return result

    async def publish(self, publisher: Publisher, at: datetime, payload: object) -> str:
        """Publish ``payload`` as the tick due at ``at`` and wait for the broker's confirm."""
        headers = {**self.headers, SCHEDULE_HEADER: self.name, SCHEDULED_AT_HEADER: _iso(at)}
        return await publisher.publish(
            self.exchange,
            self.routing_key,
            payload,
            headers=headers,
            message_id=self.tick_id(at),
        )


def default_name(func: Callable[..., Any]) -> str:
    """``examples.periodic.app.tick``."""
    return f"{func.__module__}.{getattr(func, '__qualname__', repr(func))}"


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
