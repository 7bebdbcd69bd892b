"""``App``: the consumer registry, middleware, lifespan hooks, ``publish()`` and ``request()``."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitflow import _headers as h
from rabbitflow._batch import Batch
from rabbitflow._border import broker_call
from rabbitflow._broker_version import BrokerVersion, describe
from rabbitflow._continuation import Startable
from rabbitflow._duration import parse_duration
from rabbitflow._handler import Consumer
from rabbitflow._logging import get_logger
from rabbitflow._progress import DEFAULT_INTERVAL, interval_seconds
from rabbitflow._publisher import Publisher
from rabbitflow._rpc import DEFAULT_TIMEOUT, Requester, read_reply
from rabbitflow._schedule.entry import Schedule, default_name
from rabbitflow._schedule.timing import Cron, Every, Timing
from rabbitflow._state import State
from rabbitflow._tracking import Tracker
from rabbitflow._urls import mask_url, resolve_urls, split_urls, validate_url
from rabbitflow.connection import connect, connected_url, underlay
from rabbitflow.errors import (
    BrokerError,
    ConfigurationError,
    PublishConnectionError,
    RequestTimeout,
)
from rabbitflow.idempotency._guard import Guard
from rabbitflow.idempotency._store import IdempotencyStore
from rabbitflow.job import Job, JobBook
from rabbitflow.middleware import Middleware, name_of
from rabbitflow.topology import Topology, load_topology
from rabbitflow.types import ExceptionTypes, Hook, Lifespan

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from rabbitflow.outbox import PostgresOutbox

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)
MW = TypeVar("MW", bound=Middleware)
T = TypeVar("T")

__all__ = ["App", "Batch"]

log = get_logger("rabbitflow.app")


class App:
    """A rabbitflow application: handlers bound to the queues of a topology file.

    ``topology`` is the path of ``topology.toml`` (``rabbitflow run --topology`` overrides it);
    ``url`` the broker: one URL, or a list of the nodes of one cluster (else ``--url``,
    ``RABBITFLOW_URL``, the file's ``[broker]``). Every URL is validated here.
    ``lifespan`` is an optional ``(app) -> async context manager`` wrapped around the run.
    ``idempotency`` is the store of idempotent consumers (``rabbitflow.idempotency``).
    ``jobs`` is where job statuses are kept (contract section 12): a store of
    ``rabbitflow.idempotency`` (the same one as ``idempotency`` or another), whose
    connections the job records share, or a book it made (``store.job_book(ttl_ms,
    max_result_bytes=...)``); ``jobs_ttl`` is how long a job is kept after its last change
    (``"1d"``). :attr:`jobs` is then the :class:`~rabbitflow.job.JobBook`.
    ``state`` is what handlers read as ``app.state`` (default: an empty
    :class:`~rabbitflow.state.State`; pass your own object for typed attributes).
    ``metrics_registry`` is the prometheus_client ``CollectorRegistry`` whose metrics
    ``/metrics`` serves beside rabbitflow's (default: prometheus_client's ``REGISTRY``, when
    it is installed).
    ``outbox`` is the transactional outbox (:class:`rabbitflow.outbox.PostgresOutbox`):
    ``app.outbox.publish(conn, ...)`` writes in the caller's transaction, and ``rabbitflow
    run`` runs its relay beside the consumers.
    ``progress_interval`` is how often ``rabbitflow run`` logs each busy consumer's progress
    line at INFO (``"60s"``; ``--progress-interval`` overrides it; None or 0: no lines); kept
    as seconds in :attr:`progress_interval`.
    """

    def __init__(
        self,
        topology: str | Path = "topology.toml",
        *,
        url: str | Sequence[str] | None = None,
        lifespan: Lifespan[App] | None = None,
        name: str = "rabbitflow",
        idempotency: IdempotencyStore | None = None,
        jobs: object | None = None,
        jobs_ttl: str | int = "1d",
        state: Any = None,
        metrics_registry: CollectorRegistry | None = None,
        progress_interval: str | int | float | None = DEFAULT_INTERVAL,
        outbox: PostgresOutbox | None = None,
    ) -> None:
        self.topology_path = Path(topology)
        self.progress_interval: float | None = interval_seconds(progress_interval)
        self.urls: list[str] = split_urls(url)
        for each in self.urls:
            validate_url(each)
        self.name = name
        self.lifespan = lifespan
        self.idempotency = idempotency
        self.outbox = outbox
        if outbox is not None:
            outbox.bind(self)  # app.outbox.enqueue records its jobs in this app's book
        self._jobs: JobBook | None = None if jobs is None else _job_book(jobs, jobs_ttl)
        # The store under the book, closed with the app (a book given as such is closed
        # as a book).
        self._jobs_store = None if jobs is self._jobs else jobs
        self.state: Any = State() if state is None else state
        self.metrics_registry = metrics_registry
        self.consumers: dict[str, Consumer] = {}
        self.middleware: list[Middleware] = []
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []
        self.schedules: dict[str, Schedule] = {}
        self.started = False
        self._said_not_consumed = False
        self._publisher: Publisher | None = None
        self._connection: AbstractConnection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._requester: Requester | None = None
        self._requester_lock: asyncio.Lock | None = None

    @property
    def url(self) -> str | None:
        """The first of :attr:`urls` (the node documentation and AsyncAPI name), or None."""
        return self.urls[0] if self.urls else None

    @url.setter
    def url(self, value: str | None) -> None:
        # One URL, or several separated by commas; replaces the whole list.
        urls = split_urls(value)
        for each in urls:
            validate_url(each)
        self.urls = urls

    # -- registration -----------------------------------------------------------------

    def consumer(
        self,
        queue: str,
        *,
        retry_on: ExceptionTypes = (),
        dead_letter_on: ExceptionTypes = (),
        idempotent: bool | None = None,
        track: bool | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``queue``; return it unchanged.

        ``retry_on`` limits delayed retries to these exception types (others are
        dead-lettered); ``dead_letter_on`` dead-letters these types without retrying.
        ``idempotent=True`` runs the handler once per ``message_id`` (needs
        ``App(idempotency=...)``); None leaves it to the queue's ``idempotent`` key.
        ``track=True`` records each message's job status (needs ``App(jobs=...)``); None
        leaves it to the queue's ``track`` key.
        """

        def register(func: F) -> F:
            self.add_consumer(
                Consumer(queue, func, tuple(retry_on), tuple(dead_letter_on), idempotent, track)
            )
            return func

        return register

    def add_consumer(self, consumer: Consumer) -> None:
        """Register a handler; two handlers for one queue are an error."""
        existing = self.consumers.get(consumer.queue)
        if existing is not None:
            raise ConfigurationError(
                f"queue {consumer.queue!r} has two handlers: {existing.name} and {consumer.name}"
            )
        self.consumers[consumer.queue] = consumer

    def every(
        self,
        interval: str | int,
        *,
        exchange: str,
        routing_key: str,
        name: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Callable[[F], F]:
        """Publish the decorated function's return value every ``interval`` (``"30s"``).

        Ticks fall on multiples of the interval since the Unix epoch; ``None`` skips a tick.
        Once per deployment: see :mod:`rabbitflow.schedule`."""
        return self._scheduled(Every(interval), exchange, routing_key, name, headers)

    def cron(
        self,
        expression: str,
        *,
        exchange: str,
        routing_key: str,
        timezone: str = "UTC",
        name: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Callable[[F], F]:
        """Publish the decorated function's return value on a cron schedule in ``timezone``."""
        return self._scheduled(Cron(expression, timezone), exchange, routing_key, name, headers)

    def _scheduled(
        self,
        timing: Timing,
        exchange: str,
        routing_key: str,
        name: str | None,
        headers: dict[str, Any] | None,
    ) -> Callable[[F], F]:
        def register(func: F) -> F:
            schedule_name = name or default_name(func)
            schedule = Schedule(schedule_name, timing, func, exchange, routing_key, headers or {})
            self.add_schedule(schedule)
            return func

        return register

    def add_schedule(self, schedule: Schedule) -> None:
        """Register a schedule; two schedules of one name are an error."""
        if schedule.name in self.schedules:
            raise ConfigurationError(f"two schedules are named {schedule.name!r}; pass name=...")
        self.schedules[schedule.name] = schedule

    def add_middleware(self, middleware: Middleware) -> None:
        """Run ``middleware`` around every handler: ``async (message, call_next) -> result``.

        The first added is the outermost. Refused once the app has started: each consumer's
        chain is built once, when consuming starts."""
        if self.started:
            raise ConfigurationError(
                f"cannot add middleware {name_of(middleware)} after the app has started; "
                "add it before `rabbitflow run` (or TestApp) starts the app"
            )
        if not callable(middleware):
            raise ConfigurationError(
                f"middleware must be callable as (message, call_next), got {middleware!r}"
            )
        self.middleware.append(middleware)

    def use(self, middleware: MW) -> MW:
        """Decorator form of :meth:`add_middleware`; returns the function unchanged."""
        self.add_middleware(middleware)
        return middleware

    def on_startup(self, func: Hook) -> Hook:
        """Run ``func`` after the broker connection opens and before consuming starts."""
        self.startup_hooks.append(func)
        return func

    def on_shutdown(self, func: Hook) -> Hook:
        """Run ``func`` after consuming stopped and in-flight handlers finished."""
        self.shutdown_hooks.append(func)
        return func

    # -- start-up checks ---------------------------------------------------------------

    def load_topology(self, path: str | Path | None = None) -> Topology:
        """Load the topology and check the handlers against it."""
        topology = load_topology(path or self.topology_path)
        for warning in topology.warnings:  # likely mistakes, such as timeout = 30 (30 ms)
            log.warning(str(warning), file=topology.source)
        self.check_handlers(topology)
        return topology

    def check_handlers(self, topology: Topology) -> None:
        """A handler for an unknown queue is an error; a queue without a handler a warning."""
        for queue in self.consumers:
            if queue not in topology.queues:
                close = difflib.get_close_matches(queue, list(topology.queues), n=1)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                raise ConfigurationError(
                    f"handler for queue {queue!r}, which {topology.source} does not declare{hint}"
                )
        for queue in topology.queues:
            if queue not in self.consumers:
                log.warning("queue has no handler; it is declared but not consumed", queue=queue)
        for queue in self.consumers:
            self.guard(queue, topology)
            if self.is_tracked(queue, topology):
                self.jobs  # noqa: B018  # raises ConfigurationError without App(jobs=...)

    def is_idempotent(self, queue: str, topology: Topology) -> bool:
        """The consumer's ``idempotent=`` if given, else the queue's ``idempotent`` key."""
        chosen = self.consumers[queue].idempotent
        if chosen is None:
            return topology.queues[queue].idempotent
        return bool(chosen)

    def guard(self, queue: str, topology: Topology) -> Guard | None:
        """The idempotency guard of ``queue``'s handler; None when it is not idempotent."""
        if not self.is_idempotent(queue, topology):
            return None
        if self.idempotency is None:
            raise ConfigurationError(
                f"the handler of queue {queue!r} is idempotent, but the app has no store: "
                "App(..., idempotency=RedisStore(...)) (or PostgresStore, MemoryStore)"
            )
        return Guard(queue, self.idempotency)

    def is_tracked(self, queue: str, topology: Topology) -> bool:
        """The consumer's ``track=`` if given, else the queue's ``track`` key."""
        chosen = self.consumers[queue].track
        if chosen is None:
            return topology.queues[queue].track
        return bool(chosen)

    def tracker(self, queue: str, topology: Topology) -> Tracker | None:
        """The job recorder of ``queue``'s handler; None when it is not tracked."""
        if not self.is_tracked(queue, topology):
            return None
        return self.jobs.tracker(queue)

    @property
    def keeps_jobs(self) -> bool:
        """Whether the app keeps job statuses (``App(jobs=...)``)."""
        return self._jobs is not None

    @property
    def jobs(self) -> JobBook:
        """The job statuses (``App(jobs=store)``): ``await app.jobs.get(id)``."""
        if self._jobs is None:
            raise ConfigurationError(
                "the app keeps no jobs: App(..., jobs=RedisStore(...)) "
                "(or PostgresStore, MemoryStore from rabbitflow.idempotency)"
            )
        return self._jobs

    @contextlib.asynccontextmanager
    async def lifespan_context(self) -> AsyncIterator[None]:
        """Start-up hooks and ``lifespan`` around the run; a failing start-up is fatal."""
        self.started = True
        async with contextlib.AsyncExitStack() as stack:
            if self.idempotency is not None:
                stack.push_async_callback(self._close_store, self.idempotency)
            if self._jobs_store is not None and self._jobs_store is not self.idempotency:
                stack.push_async_callback(self._close_store, self._jobs_store)
            if self._jobs is not None:
                stack.push_async_callback(self._close_jobs, self._jobs)
            if self.lifespan is not None:
                await stack.enter_async_context(self.lifespan(self))
            for hook in self.startup_hooks:
                await _call_hook(hook)
            try:
                yield
            finally:
                for hook in self.shutdown_hooks:
                    try:
                        await _call_hook(hook)
                    except Exception as exc:
                        log.error("shutdown hook failed", hook=_hook_name(hook), error=repr(exc))

    @staticmethod
    async def _close_store(store: Any) -> None:
        try:
            await store.close()
        except Exception as exc:
            log.error("closing the idempotency store failed", error=repr(exc))

    @staticmethod
    async def _close_jobs(book: JobBook) -> None:
        try:
            await book.close()
        except Exception as exc:
            log.error("closing the job store failed", error=repr(exc))

    # -- publishing --------------------------------------------------------------------

    def attach(self, publisher: Publisher | None) -> None:
        """Used by the worker: publish through its connection."""
        self._publisher = publisher

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        priority: int | None = None,
        expiration: int | None = None,
        reply_to: str | None = None,
        delay: str | int | timedelta | None = None,
    ) -> str:
        """Publish and wait for the broker's confirm; return the ``message_id``.

        Pydantic models and JSON values go as ``application/json``, ``str`` as ``text/plain``,
        ``bytes`` as ``application/octet-stream``. ``delay`` (``"10m"``, milliseconds or a
        ``timedelta``) delivers the message to its handler no earlier than that: it carries a
        ``rabbitflow-not-before`` and waits in the retry tiers of each queue it reaches (see
        docs/workflows.md); ``ValueError`` for a delay that is not a duration. Raises
        :class:`~rabbitflow.UnroutableError` when no queue is bound for the routing key,
        :class:`~rabbitflow.PublishError` when the broker does not confirm, and
        :class:`~rabbitflow.PublishConnectionError` (a ``PublishError`` too, and the
        ``BrokerError`` of the connection) when no connection could be opened: every way the
        message can fail to reach the broker is a ``PublishError``.
        """
        if delay is not None:
            headers = {**(headers or {}), h.NOT_BEFORE: h.not_before_after(delay)}
        publisher = await self._publisher_for(exchange, routing_key)
        return await publisher.publish(
            exchange,
            routing_key,
            payload,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            persistent=persistent,
            mandatory=mandatory,
            priority=priority,
            expiration=expiration,
            reply_to=reply_to,
        )

    async def enqueue(
        self,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        headers: dict[str, Any] | None = None,
        job_id: str | None = None,
        priority: int | None = None,
        delay: str | int | timedelta | None = None,
    ) -> Job:
        """Publish a job and return it at once, ``queued`` (contract section 12).

        The message is published as :meth:`publish` does (confirmed, persistent, mandatory);
        ``job_id`` (default: a new one) is its ``message_id``. The job is recorded
        ``queued`` once the broker confirmed it: a publish that fails raises its
        ``PublishError`` and leaves no job behind. A consumer with ``track`` records the
        rest. When the job store does not answer the message is sent all the same and a
        warning logged: the worker records the job once it runs it. ``delay`` runs it no
        earlier than that, as :meth:`publish` does (it stays ``queued`` meanwhile)."""
        book = self.jobs
        job_id = job_id or uuid.uuid4().hex
        await self.publish(
            exchange,
            routing_key,
            payload,
            headers=headers,
            message_id=job_id,
            priority=priority,
            delay=delay,
        )
        try:
            await book.record_queued(job_id)
        except Exception as exc:
            log.warning(
                "job sent, but the job store did not record it queued",
                job_id=job_id,
                error=str(exc),
            )
        return Job(job_id, book)

    def job(self, job_id: str) -> Job:
        """The job of this id (``job.status()``, ``job.result()``, ``job.cancel()``)."""
        return Job(job_id, self.jobs)

    def batch(self, *, timeout: float | None = 30.0) -> Batch:
        """A batch of publishes, sent together and confirmed message by message.

        ``async with app.batch() as batch:`` then ``batch.publish(...)`` (the arguments of
        :meth:`publish`; nothing is sent yet, it returns the message id) for each message;
        when the block ends the batch is written to the broker in a few large writes
        instead of one per message, and every confirm is awaited. Confirms and mandatory
        routing stay per message: :class:`~rabbitflow.errors.BatchPublishError` (a
        :class:`~rabbitflow.PublishError`) lists each message that was returned, nacked,
        not confirmed within ``timeout`` seconds or never sent, by index and message id;
        the others are confirmed all the same. A block that raises sends nothing; without a
        connection nothing is sent either: :class:`~rabbitflow.PublishConnectionError`.
        """
        return Batch(self._ready_publisher, timeout=timeout)

    async def publish_many(
        self,
        exchange: str,
        routing_key: str,
        payloads: Sequence[object],
        *,
        message_ids: Sequence[str] | None = None,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        timeout: float | None = 30.0,
    ) -> list[str]:
        """Publish every payload to one exchange and routing key as one :meth:`batch`.

        ``message_ids``, when given, has one id per payload. Returns the message ids in
        order once every message is confirmed; raises
        :class:`~rabbitflow.errors.BatchPublishError` as :meth:`batch` does, and
        :class:`~rabbitflow.PublishConnectionError` when no connection could be opened
        (nothing was sent)."""
        if message_ids is not None and len(message_ids) != len(payloads):
            raise ValueError(f"{len(message_ids)} message_ids for {len(payloads)} payloads")
        batch = Batch(self._ready_publisher, timeout=timeout)
        for index, payload in enumerate(payloads):
            batch.publish(
                exchange,
                routing_key,
                payload,
                headers=headers,
                message_id=None if message_ids is None else message_ids[index],
                persistent=persistent,
                mandatory=mandatory,
            )
        return await batch.send()

    async def _ready_publisher(self) -> Publisher:
        publisher = self._publisher
        if publisher is None or not publisher.is_open:
            publisher = await self._own_publisher()
        return publisher

    async def _publisher_for(self, exchange: str, routing_key: str) -> Publisher:
        """The publisher for a message to ``exchange`` / ``routing_key``: a failure to
        connect is the message's :class:`~rabbitflow.errors.PublishConnectionError`."""
        try:
            return await self._ready_publisher()
        except BrokerError as exc:
            raise PublishConnectionError.of(exc, exchange, routing_key) from None

    # -- workflows -----------------------------------------------------------------------

    async def start(self, flow: Startable) -> Any:
        """Start a workflow: ``chain``, ``group``, ``chord`` or a lone ``step`` of
        :mod:`rabbitflow.workflows` (contract section 14). Returns its
        :class:`~rabbitflow.workflows.Flow`, whose ``id`` names it; raises
        :class:`~rabbitflow.errors.WorkflowError` for a workflow it cannot run (before
        anything is published) and what :meth:`publish` raises."""
        start = getattr(flow, "start", None)
        if not callable(start):
            raise TypeError(
                f"app.start() takes a chain, group, chord or step, not {type(flow).__name__}"
            )
        return await flow.start(self)

    # -- request / reply -----------------------------------------------------------------

    @overload
    async def request(
        self,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        timeout: float = ...,
        response_model: type[M],
        headers: dict[str, Any] | None = ...,
        message_id: str | None = ...,
    ) -> M: ...
    @overload
    async def request(
        self,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        timeout: float = ...,
        response_model: None = ...,
        headers: dict[str, Any] | None = ...,
        message_id: str | None = ...,
    ) -> Any: ...
    async def request(
        self,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        response_model: type[BaseModel] | None = None,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Any:
        """Publish a request and return the handler's reply (contract section 7).

        The reply comes over direct reply-to on this app's connection; any number of
        requests may be in flight. With ``response_model`` the reply is validated into it;
        without, JSON is parsed, text returned as ``str``, anything else as ``bytes``.
        ``message_id`` (default: a new one) lets an idempotent handler recognise a repeat.
        Raises :class:`~rabbitflow.RequestTimeout` after ``timeout`` seconds without a
        reply, :class:`~rabbitflow.RemoteError` when the handler failed for good,
        :class:`~rabbitflow.UnroutableError` when no queue takes the request,
        :class:`~rabbitflow.PublishError` when it could not be sent (no connection:
        :class:`~rabbitflow.PublishConnectionError`), and :class:`~rabbitflow.BrokerError`
        when the connection is lost while waiting.

        ``timeout`` bounds the whole call (connecting, publishing, waiting), and the request
        carries it: the broker drops it from the queue, and a worker settles it without
        running it, once its caller stopped waiting. :class:`~rabbitflow.RequestTimeout`
        says whether the request was ``sent`` (docs/handlers.md, "Requests that expire");
        ``math.inf`` waits for ever and the request never expires."""
        if not timeout > 0:  # NaN too
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        message_id = message_id or uuid.uuid4().hex
        deadline = asyncio.get_running_loop().time() + timeout
        requester = self._current_requester()
        if requester is None:
            try:
                async with asyncio.timeout_at(deadline):
                    requester = await self._requester_for_connection()
            except TimeoutError:
                raise RequestTimeout(
                    exchange, routing_key, timeout, sent=False, message_id=message_id
                ) from None
            except BrokerError as exc:
                raise PublishConnectionError.of(exc, exchange, routing_key) from None
        reply = await requester.request(
            exchange,
            routing_key,
            payload,
            timeout=timeout,
            deadline=deadline,
            headers=headers,
            message_id=message_id,
        )
        return read_reply(reply, response_model)

    @property
    def requests_in_flight(self) -> int:
        """Requests of :meth:`request` waiting for their reply."""
        return 0 if self._requester is None else self._requester.in_flight

    def _current_requester(self) -> Requester | None:
        """The requester of the open connection, if one is ready (no await on the hot path)."""
        publisher, requester = self._publisher, self._requester
        if (
            publisher is not None
            and publisher.is_open
            and requester is not None
            and requester.is_open
            and requester.connection is publisher.connection
        ):
            return requester
        return None

    async def _requester_for_connection(self) -> Requester:
        requester = self._current_requester()
        if requester is not None:
            return requester
        publisher = self._publisher
        if publisher is None or not publisher.is_open:
            # Connecting is shared by every caller: one whose timeout passes stops waiting,
            # but the connection is still opened, for the others and for its next call.
            publisher = await _shielded(self._own_publisher())
        if self._requester_lock is None:
            self._requester_lock = asyncio.Lock()
        async with self._requester_lock:
            requester = self._requester
            if (
                requester is None
                or not requester.is_open
                or requester.connection is not publisher.connection
            ):
                # One reply consumer per connection: a new connection gets a new one.
                with broker_call("opening the reply channel"):
                    requester = await Requester.open(publisher.connection)
                self._requester = requester
            return requester

    async def _own_publisher(self) -> Publisher:
        # Outside ``rabbitflow run`` (a web app, a script) the app opens its own connection on
        # first publish, and again after it was lost.
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._publisher is not None and self._publisher.is_open:
                return self._publisher
            if self._connection is not None and not self._connection.is_closed:
                await self._connection.close()
            urls = resolve_urls(self.urls, self._file_urls(), order="shuffle")
            self._connection = await connect(urls, name=f"{self.name}-publisher")
            log.info(
                "publisher connected",
                url=mask_url(connected_url(self._connection)),
                broker_version=describe(BrokerVersion.of(self._connection)),
            )
            with broker_call("opening the publishing channel"):
                self._publisher = await Publisher.open(underlay(self._connection))
            return self._publisher

    def _file_urls(self) -> list[str]:
        try:
            return list(load_topology(self.topology_path).broker_urls)
        except Exception:
            return []

    async def close(self) -> None:
        """Close the connection ``publish()`` opened, if any, and write the job statuses
        still pending."""
        if self._jobs is not None:
            await self._close_jobs(self._jobs)
        self._requester = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self._publisher = None

    async def __aenter__(self) -> App:
        self._warn_not_consumed()
        return self

    def _warn_not_consumed(self) -> None:
        """Opened with consumers, while no worker of this process consumes them: say so,
        once. (A web app that opens the app in its lifespan publishes fine and consumes
        nothing; its messages wait in the queues for a ``rabbitflow run`` that may not exist.)
        """
        if not self.consumers or self.started or self._said_not_consumed:
            return
        self._said_not_consumed = True
        log.warning(
            "the app has consumers that this process does not consume; they run under "
            "`rabbitflow run` or rabbitflow.asgi.lifespan(app, consume=True)",
            app=self.name,
            consumers=[f"{queue} -> {c.name}" for queue, c in sorted(self.consumers.items())],
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _shielded(work: Awaitable[T]) -> T:
    """``work`` in a task of its own, which a cancelled caller does not cancel."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Nobody may await work that outlived its caller: its error is read here, so that
    # asyncio does not print "exception was never retrieved" (the next call raises it anew).
    if not task.cancelled():
        task.exception()


def _job_book(store: object, ttl: str | int) -> JobBook:
    """The job book on ``store``: a store of ``rabbitflow.idempotency`` (it opens one with
    ``job_book(ttl_ms)``), or a job book already."""
    ttl_ms = parse_duration(ttl)
    if ttl_ms <= 0:
        raise ValueError(f"jobs_ttl must be a positive duration, not {ttl!r}")
    if callable(getattr(store, "tracker", None)) and callable(getattr(store, "get", None)):
        return store  # type: ignore[return-value]  # a JobBook by its methods
    opener = getattr(store, "job_book", None)
    if not callable(opener):
        raise ConfigurationError(
            f"App(jobs=...) takes a store of rabbitflow.idempotency (RedisStore, "
            f"PostgresStore, MemoryStore), not {store!r}"
        )
    book: JobBook = opener(ttl_ms)
    return book


async def _call_hook(hook: Hook) -> None:
    result = hook()
    if result is not None:
        await result


def _hook_name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", repr(hook))
