"""A worker in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from rabbitflow import App
from rabbitflow._worker import Worker, WorkerOptions
from rabbitflow.topology import Topology
from tests.support.waiting import wait_for


@contextlib.asynccontextmanager
async def running(
    app: App,
    url: str,
    *,
    topology: Topology | None = None,
    ready_timeout: float = 15.0,
    **options: Any,
) -> AsyncIterator[Worker]:
    """A Worker for ``app`` consuming on the test's event loop; stopped (and awaited) on exit.

    ``topology`` is the app's own unless given; ``options`` are :class:`WorkerOptions`;
    ``shutdown_timeout`` is 5 s unless given."""
    options.setdefault("shutdown_timeout", 5.0)
    chosen = app.load_topology() if topology is None else topology
    worker = Worker(app, chosen, WorkerOptions(url=url, **options))
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: worker.ready or task.done(), "the worker to consume", ready_timeout)
        if task.done():
            task.result()  # raises what stopped the worker
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
