"""``lifespan(app, consume=...)``: a rabbitflow :class:`~rabbitflow.App` inside an ASGI app.

The object is what FastAPI, Starlette (and any framework that takes a Starlette-style
lifespan: ``(asgi_app) -> async context manager``) accept as ``lifespan=``. With
``consume=True`` it runs the very :class:`~rabbitflow._worker.Worker` of ``rabbitflow run``
as a task of the web server's event loop, with its
:class:`~rabbitflow._services.Services`: same prefetch, retries, declaration, reconnection,
readiness and drain. The web server's shutdown (SIGTERM to uvicorn) is the worker's stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

# Consumers run here carry workflow steps on (the step hook), as under `rabbitflow run`,
# whatever the app's module imports.
import rabbitflow.workflows  # noqa: F401
from rabbitflow._logging import get_logger
from rabbitflow._options import WorkerOptions
from rabbitflow._urls import resolve_urls
from rabbitflow._worker import DRAIN_GRACE, Worker
from rabbitflow.app import App
from rabbitflow.asgi._health import ConsumerHealth, ConsumerState

log = get_logger("rabbitflow.asgi")


class AppLifespan:
    """The lifespan of a web app that publishes through ``app``, and with ``consume=True``
    consumes its queues too. Built by :func:`lifespan`; see there for the options.

    ``health()`` (a FastAPI dependency as it is) says where the consumers stand;
    ``readyz`` is a Starlette endpoint that answers it as JSON, 200 when ready, else 503."""

    __slots__ = (
        "_options",
        "_ready_timeout",
        "_serving",
        "_task",
        "_topology",
        "_worker",
        "app",
        "consume",
    )

    def __init__(
        self,
        app: App,
        *,
        consume: bool,
        options: dict[str, Any],
        topology: str | Path | None,
        ready_timeout: float,
    ) -> None:
        self.app = app
        self.consume = consume
        self._options = options
        self._topology = topology
        self._ready_timeout = ready_timeout
        self._worker: Worker | None = None
        self._task: asyncio.Task[None] | None = None
        self._serving = False  # start-up is over: an error of the worker is no longer raised

    def __call__(self, asgi_app: object) -> AbstractAsyncContextManager[None]:
        """The context the ASGI server enters at start-up and leaves at shutdown."""
        return self._consuming() if self.consume else self._publishing()

    @contextlib.asynccontextmanager
    async def _publishing(self) -> AsyncIterator[None]:
        # ``async with app`` warns once when the app has consumers: this process does not
        # consume them (rabbitflow.App.__aenter__).
        async with self.app:
            yield

    @contextlib.asynccontextmanager
    async def _consuming(self) -> AsyncIterator[None]:
        worker = self._build()
        task = asyncio.ensure_future(worker.run())
        task.add_done_callback(self._ended)
        self._worker, self._task, self._serving = worker, task, False
        try:
            await self._until_ready(worker, task)
            self._serving = True
            yield
        finally:
            await self._stop(worker, task)

    def _build(self) -> Worker:
        topology = self.app.load_topology(self._topology)
        options = dict(self._options)
        urls = resolve_urls(
            options.pop("url") or self.app.urls, topology.broker_urls, order="shuffle"
        )
        return Worker(self.app, topology, WorkerOptions(url=urls, **options))

    async def _until_ready(self, worker: Worker, task: asyncio.Task[None]) -> None:
        """Start-up waits until the consumers consume, at most ``ready_timeout`` seconds.

        An error that ends the worker (a refused login, a topology conflict, a failing
        start-up hook) fails the web app's start-up, as it fails ``rabbitflow run``. A broker
        that does not answer yet does not: the web app starts, not ready, while the worker
        keeps connecting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        while not worker.ready and not task.done() and loop.time() < deadline:
            await asyncio.wait({task}, timeout=min(0.05, max(deadline - loop.time(), 0)))
        if task.done():
            task.result()  # raises what ended the worker
            return
        if not worker.ready:
            log.warning(
                "consumers not consuming yet; the web app starts and the worker keeps trying",
                waited_s=self._ready_timeout,
                queues=sorted(self.app.consumers),
            )

    async def _stop(self, worker: Worker, task: asyncio.Task[None]) -> None:
        """Stop deliveries, let in-flight handlers finish (``shutdown_timeout``), ack, close."""
        worker.stop()
        limit = worker.options.shutdown_timeout + DRAIN_GRACE
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            # What the broker does not get acked before the connection goes is requeued.
            log.error("shutdown did not finish in time; unacked messages return to their queues")
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    def _ended(self, task: asyncio.Task[None]) -> None:
        # Before the web app serves, the start-up raises the error instead.
        if task.cancelled() or task.exception() is None or not self._serving:
            return
        log.error(
            "the consumers stopped on an error; this process no longer consumes",
            error=str(task.exception()),
            during_shutdown=self._worker is not None and self._worker.stopping,
            queues=sorted(self.app.consumers),
        )

    # -- health ------------------------------------------------------------------------------

    def health(self) -> ConsumerHealth:
        """Where the consumers of this process stand (a FastAPI dependency as it is)."""
        worker, task = self._worker, self._task
        if not self.consume:
            return ConsumerHealth("disabled")
        if worker is None or task is None:
            return ConsumerHealth("stopped", tuple(sorted(self.app.consumers)))
        error = None
        if task.done() and not task.cancelled() and task.exception() is not None:
            error = str(task.exception())
        return ConsumerHealth(
            _state(worker, task, error),
            tuple(sorted(self.app.consumers)),
            tuple(sorted(worker.paused)),
            len(worker.consumers.in_flight),
            worker.reconnections,
            error,
        )

    async def readyz(self, request: Any) -> Any:
        """A Starlette endpoint: :meth:`health` as JSON, 200 when ready, else 503.

        ``api.add_route("/readyz", consumers.readyz)`` (FastAPI or Starlette), or
        ``Route("/readyz", consumers.readyz)``."""
        from starlette.responses import JSONResponse

        health = self.health()
        return JSONResponse(health.as_dict(), status_code=200 if health.ready else 503)


def _state(worker: Worker, task: asyncio.Task[None], error: str | None) -> ConsumerState:
    if error is not None:
        return "failed"
    if task.done() or worker.finished:
        return "stopped"
    if worker.stopping:
        return "stopping"
    return "consuming" if worker.ready else "connecting"


def lifespan(
    app: App,
    *,
    consume: bool = False,
    url: str | Sequence[str] | None = None,
    topology: str | Path | None = None,
    declare: bool = True,
    shutdown_timeout: float = 30.0,
    heartbeat: int | None = None,
    reconnect_max_wait: float = 30.0,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    ready_timeout: float = 10.0,
) -> AppLifespan:
    """The lifespan of a web app that uses ``app``: ``FastAPI(lifespan=lifespan(app))``.

    ``consume=False`` (default): the web app publishes, requests and enqueues; the connection
    opens on first use and closes at shutdown. Handlers run elsewhere (``rabbitflow run``);
    an app with consumers says so once, as a warning naming them.

    ``consume=True``: the app's consumers also run in this process, as ``rabbitflow run``
    runs them: the same prefetch, retries, dead letters, topology declaration (``declare=False``
    verifies, like ``--no-declare``), reconnection and failover (``reconnect_max_wait``),
    start-up hooks and drain on shutdown (``shutdown_timeout`` seconds for in-flight handlers,
    like ``--shutdown-timeout``). ``url`` (default: the App's, else ``RABBITFLOW_URL``, else
    the topology file's ``[broker]``) and ``topology`` (default: the App's) as for
    ``rabbitflow run``; ``metrics_port`` serves ``/metrics``, ``/healthz`` and ``/readyz`` on a
    port of their own. Start-up waits until the consumers consume, at most ``ready_timeout``
    seconds; an error that would end ``rabbitflow run`` fails the web app's start-up.
    """
    options: dict[str, Any] = {
        "url": url,
        "declare": declare,
        "shutdown_timeout": shutdown_timeout,
        "heartbeat": heartbeat,
        "max_reconnect_wait": reconnect_max_wait,
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,
        "progress_interval": app.progress_interval,
    }
    return AppLifespan(
        app, consume=consume, options=options, topology=topology, ready_timeout=ready_timeout
    )
