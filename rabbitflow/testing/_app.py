"""``TestApp``: an :class:`~rabbitflow.App` running its real consumer code on the in-memory broker.

The handlers run through the same ``Dispatcher``, ``OutcomePolicy``, ``Settler``, ``Acker`` and
``Publisher`` as under ``rabbitflow run``: retries go through the retry-tier queues (whose TTLs
expire on the virtual clock) and dead letters reach ``Q.dlq`` with the contract headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

# Consumers run here carry workflow steps on (the step hook), as under `rabbitflow run`,
# whatever the app's module imports.
import rabbitflow.workflows  # noqa: F401
from rabbitflow._consumers import ConsumerSet, RunningConsumer
from rabbitflow._duration import parse_duration
from rabbitflow._handler import Consumer, Signature
from rabbitflow._metrics import Metrics
from rabbitflow._publisher import Publisher
from rabbitflow._schedule import Schedule
from rabbitflow._streams.offsets import Callback
from rabbitflow.app import App
from rabbitflow.errors import DrainError
from rabbitflow.message import Message, read_attempt
from rabbitflow.testing._broker import MemoryBroker
from rabbitflow.testing._channel import MemoryChannel, MemoryConnection
from rabbitflow.testing._clock import VirtualClock, wall_clock
from rabbitflow.testing._envelope import StoredMessage
from rabbitflow.testing._queue import MemoryQueue
from rabbitflow.topology import Topology, dlq_name

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(slots=True)
class Handled:
    """One handler run: what it was given, the delivery, and what it raised (None: returned)."""

    payload: Any
    message: Message
    error: BaseException | None = None

    @property
    def attempt(self) -> int:
        return self.message.attempt


@dataclass(slots=True)
class _Current:
    delivery: DeliveredMessage
    calls: int = 0


_CURRENT: contextvars.ContextVar[_Current | None] = contextvars.ContextVar(
    "rabbitflow_testing_delivery", default=None
)


class _InlineExecutor(Executor):
    """Runs a sync handler at once on the event loop thread: one at a time, in order."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class TestApp:
    """Run ``app``'s handlers against an in-memory broker, with virtual time.

    ``topology`` is a :class:`~rabbitflow.topology.Topology` (e.g. from ``parse_topology``),
    a file path, or None for the app's own ``topology.toml``. Sync handlers run inline on the
    event loop (deterministic order) unless ``threads=True``. ``lifespan`` runs the app's
    start-up/shutdown hooks around the test. ``timeout`` (real seconds) bounds how long
    :meth:`drain` waits for handlers.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: App,
        topology: Topology | str | Path | None = None,
        *,
        broker: MemoryBroker | None = None,
        lifespan: bool = True,
        threads: bool = False,
        timeout: float = 10.0,
        max_steps: int = 100_000,
    ) -> None:
        self.app = app
        self.broker = broker or MemoryBroker()
        self.clock: VirtualClock = self.broker.clock
        self.timeout = timeout
        self.max_steps = max_steps
        self._source = topology
        self._lifespan = lifespan
        self._handled: dict[str, list[Handled]] = {}
        self._running: list[RunningConsumer] = []
        self._stack = contextlib.AsyncExitStack()
        self._consumers: ConsumerSet | None = None
        self._executor: Executor = (
            ThreadPoolExecutor(thread_name_prefix="rabbitflow-test-handler")
            if threads
            else _InlineExecutor()
        )
        self._publisher: Publisher | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> TestApp:
        try:
            await self._open()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _open(self) -> None:
        topology = self._load()
        # The worker's own wiring (handler signatures, outcome policies, derived topology),
        # so the test runs exactly what `rabbitflow run` would. Circuit breakers and stream
        # offsets wait in real time, which the virtual clock does not drive: they stay off.
        consumers = ConsumerSet.build(
            self.app,
            topology,
            executor=self._executor,
            breakers=False,
            streams=False,
            instrument=self._recorded,
            wrap=_delivering,
        )
        self._consumers = consumers
        self.broker.declare(consumers.declarations)
        self._stack.enter_context(wall_clock(self.clock))
        self._stack.push_async_callback(self._shutdown)
        connection = self.broker.connect()
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._publisher = Publisher(
            cast(AbstractConnection, connection), cast(AbstractChannel, channel)
        )
        self.app.attach(self._publisher)
        self._stack.callback(self.app.attach, None)
        if self._lifespan:
            await self._stack.enter_async_context(self.app.lifespan_context())
        self._running = await consumers.start(cast(AbstractConnection, connection), self._publisher)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def _load(self) -> Topology:
        if self._source is None:
            return self.app.load_topology()
        if isinstance(self._source, Topology):
            self.app.check_handlers(self._source)
            return self._source
        return self.app.load_topology(self._source)

    async def _shutdown(self) -> None:
        # As the worker drains: basic.cancel first, so that what the drain gives back (a
        # nack on 4.3) is not delivered to the same consumers again.
        for consumer in self._running:
            await consumer.cancel()
        for task in self.broker.pending():
            task.cancel()
        await self.broker.close()
        for consumer in self._running:
            await consumer.drain()
        if self._publisher is not None:
            # The connection goes, and RabbitMQ returns what is still unacked (counted).
            await cast(MemoryConnection, self._publisher.connection).close()
        if self._consumers is not None:
            self._consumers.close()
        await asyncio.sleep(0)  # let the ackers' cancelled flush tasks finish

    # -- recording what handlers saw ---------------------------------------------------------

    def _recorded(self, consumer: Consumer, signature: Signature) -> Consumer:
        calls = self._handled.setdefault(consumer.queue, [])
        func = consumer.func
        queue = consumer.queue

        def begin(args: tuple[Any, ...]) -> Handled:
            current = _CURRENT.get()
            assert current is not None
            current.calls += 1
            message = next((arg for arg in args if isinstance(arg, Message)), None)
            if message is None:
                # The dispatcher counts an immediate retry as the next attempt of one delivery.
                headers = current.delivery.header.properties.headers
                attempt = read_attempt(headers) + current.calls - 1
                message = Message(current.delivery, queue, attempt)
            entry = Handled(message.body if signature.message_only else args[0], message)
            calls.append(entry)
            return entry

        if signature.is_async:

            async def handler(*args: Any) -> Any:
                entry = begin(args)
                try:
                    return await func(*args)
                except BaseException as exc:
                    entry.error = exc
                    raise

        else:

            def handler(*args: Any) -> Any:  # type: ignore[misc]
                entry = begin(args)
                try:
                    return func(*args)
                except BaseException as exc:
                    entry.error = exc
                    raise

        return Consumer(
            queue, handler, consumer.retry_on, consumer.dead_letter_on, consumer.idempotent
        )

    # -- what tests call ---------------------------------------------------------------------

    @property
    def metrics(self) -> Metrics:
        """The metrics the handlers updated (as ``/metrics`` would show them)."""
        assert self._consumers is not None, "use TestApp as `async with TestApp(app) as t:`"
        return self._consumers.metrics

    @property
    def topology(self) -> Topology:
        assert self._consumers is not None, "use TestApp as `async with TestApp(app) as t:`"
        return self._consumers.topology

    async def publish(
        self, exchange: str, routing_key: str, payload: object, **options: Any
    ) -> str:
        """``app.publish`` on the in-memory broker (same options); return the message id.

        Handlers do not run until :meth:`drain` (or :meth:`advance`)."""
        if self._publisher is None:
            raise RuntimeError("use TestApp as `async with TestApp(app) as t:` before publishing")
        return await self.app.publish(exchange, routing_key, payload, **options)

    async def drain(self) -> None:
        """Run handlers until every queue is settled and no message waits for a TTL.

        Whenever nothing else can run, the virtual clock jumps to the next expiry (a retry tier
        releasing its messages, say). Raises :class:`DrainError` when handlers are still
        running after ``timeout`` real seconds, when messages keep moving for ``max_steps``
        expiries, or when a consumer callback failed or the broker closed a channel."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        for _ in range(self.max_steps):
            await self._settle(deadline)
            upcoming = self.broker.next_deadline()
            if upcoming is None:
                return
            self.broker.advance_to(upcoming)
        raise DrainError(
            f"messages were still expiring after {self.max_steps} steps of virtual time; "
            f"do they loop? ({self._summary()})"
        )

    async def advance(self, delay: str | int) -> None:
        """Let ``delay`` (``"30s"`` or ms) of virtual time pass, running handlers on the way."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        target = self.clock.now_ms() + parse_duration(delay)
        await self._settle(deadline)
        while (upcoming := self.broker.next_deadline()) is not None and upcoming <= target:
            self.broker.advance_to(upcoming)
            await self._settle(deadline)
        self.broker.advance_to(target)
        await self._settle(deadline)

    async def _settle(self, deadline: float) -> None:
        """Wait until no delivery is being handled and every ack has reached the broker."""
        loop = asyncio.get_running_loop()
        while True:
            pending = self.broker.pending()
            if pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DrainError(
                        f"handlers still running after {self.timeout}s ({self._summary()})"
                    )
                await asyncio.wait(pending, timeout=remaining)
                continue
            for consumer in self._running:
                await consumer.flush()
            if self.app.keeps_jobs:
                # Job statuses are written in the background, batched: a drained app has
                # them in its store, as a test reading app.jobs expects.
                await self.app.jobs.flush()
            await asyncio.sleep(0)
            if not self.broker.pending():
                break
        self._raise_errors()

    def _raise_errors(self) -> None:
        errors, self.broker.errors = self.broker.errors, []
        if errors:
            detail = "; ".join(repr(error) for error in errors)
            raise DrainError(f"the in-memory broker saw errors: {detail}") from errors[0]

    def _summary(self) -> str:
        busy = [
            f"{q.name}: {len(q)} ready, {q.unacked} unacked"
            for q in self.broker.queues.values()
            if len(q) or q.unacked
        ]
        return "; ".join(busy) or "all queues empty"

    async def tick(
        self, schedule: str | Callable[..., Any], at: datetime | None = None
    ) -> str | None:
        """Run one tick of a ``@app.every`` / ``@app.cron`` schedule, as the scheduler would.

        ``schedule`` is the decorated function or its schedule name; ``at`` the tick's time
        (default: the latest tick at or before the virtual clock). The return value is
        published with the tick's ``message_id``, which is returned (None: the function
        returned None). Handlers run on the next :meth:`drain`."""
        if self._publisher is None:
            raise RuntimeError("use TestApp as `async with TestApp(app) as t:` before a tick")
        entry = _find_schedule(self.app, schedule)
        moment = at or entry.timing.latest(datetime.fromtimestamp(self.clock.time(), UTC))
        payload = await entry.produce()
        if payload is None:
            return None
        return await entry.publish(self._publisher, moment, payload)

    def queue(self, name: str) -> MemoryQueue:
        """A queue of the broker; ``.messages`` lists what waits in it."""
        return self.broker.queue(name)

    def dead_letters(self, queue: str) -> list[StoredMessage]:
        """The messages in ``queue``'s dead-letter queue (``<queue>.dlq``)."""
        return self.broker.queue(dlq_name(queue)).messages

    def handled(self, queue: str) -> list[Handled]:
        """Every run of ``queue``'s handler so far, in order (retries included)."""
        if queue not in self.app.consumers:
            raise KeyError(f"no handler for queue {queue!r}")
        return list(self._handled.get(queue, []))


def _delivering(dispatcher: Callback) -> Callback:
    """Each delivery's handler runs knowing the delivery (see ``_recorded``)."""

    async def deliver(delivery: DeliveredMessage) -> None:
        token = _CURRENT.set(_Current(delivery))
        try:
            await dispatcher(delivery)
        finally:
            _CURRENT.reset(token)

    return deliver


def _find_schedule(app: App, schedule: str | Callable[..., Any]) -> Schedule:
    for entry in app.schedules.values():
        if entry.name == schedule or entry.func is schedule:
            return entry
    known = ", ".join(sorted(app.schedules)) or "none"
    raise KeyError(f"no schedule {schedule!r} on the app (schedules: {known})")


__all__ = ["DrainError", "Handled", "MemoryChannel", "TestApp"]
