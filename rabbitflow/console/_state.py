"""The console's state: its settings, its one broker link, and what every route needs."""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractConnection
from starlette.templating import Jinja2Templates

from rabbitflow import dlq as ops
from rabbitflow.connection import connect
from rabbitflow.console._actions import Outcome
from rabbitflow.console._guard import Guard
from rabbitflow.console._management import Management
from rabbitflow.job import JobBook
from rabbitflow.outbox import PostgresOutbox
from rabbitflow.topology import Topology, derive

RESULTS_KEPT = 50


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """What ``rabbitflow console`` was started with."""

    url: str
    topology: Topology
    token: str | None = None
    read_only: bool = False
    host: str = "127.0.0.1"
    management_url: str | None = None
    limit: int = 500
    # The outbox (``--outbox-dsn URL``): the /outbox page.
    outbox: PostgresOutbox | None = None
    # The job store (``--jobs URL``): the job page, and replays that queue jobs again.
    jobs: JobBook | None = None


class Link:
    """One AMQP connection for the console, opened on first use and again after a loss."""

    __slots__ = ("_connection", "_lock", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> AbstractConnection:
        async with self._lock:
            if self._connection is None or self._connection.is_closed:
                self._connection = await connect(self.url, name="rabbitflow console")
            return self._connection

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()


@dataclass(slots=True)
class Console:
    """Everything a route needs: settings, the broker link, templates and the guard."""

    settings: ConsoleSettings
    link: Link
    guard: Guard
    templates: Jinja2Templates
    management: Management | None
    diagram: str
    # One DLQ operation at a time: a reader holds a DLQ's messages unacked while it reads,
    # so a second reader of the same queue would see a part of it, or scramble its order.
    dlq_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    results: OrderedDict[str, tuple[str, Outcome]] = field(default_factory=OrderedDict)
    # The last read of each DLQ (monotonic time, what it saw): a message's page and a
    # confirmation reuse it for a while instead of reading the queue again, since every read
    # is a delivery of each message read (see rabbitflow.console.reads).
    reads: dict[str, tuple[float, ops.Peek]] = field(default_factory=dict)

    def remember(self, queue: str, outcome: Outcome) -> str:
        """Keep a result line for the page the action redirects to; returns its id."""
        key = secrets.token_urlsafe(8)
        self.results[key] = (queue, outcome)
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)
        return key

    def dlq_arguments(self, queue: str) -> dict[str, Any]:
        """The arguments the topology declares ``Q.dlq`` with."""
        name = ops.queue_names(queue)[1]
        specs = derive(self.settings.topology).queues
        return next((dict(spec.arguments) for spec in specs if spec.name == name), {})

    def dead_lettered(self) -> list[str]:
        """Work queues of the topology that have a DLQ."""
        routes = derive(self.settings.topology).routes
        return [name for name, r in routes.items() if r.dead_letter_exchange is not None]
