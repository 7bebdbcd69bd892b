"""``App``: the consumer registry, lifespan hooks and ``publish()``."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aio_pika.abc import AbstractConnection

from rabbitflow.broker_version import BrokerVersion, describe
from rabbitflow.connection import connect, connected_url, underlay
from rabbitflow.errors import ConfigurationError
from rabbitflow.handler import Consumer, ExceptionTypes
from rabbitflow.publisher import Publisher
from rabbitflow.topology import Topology, load_topology
from rabbitflow.urls import mask_url, resolve_urls, split_urls, validate_url

F = TypeVar("F", bound=Callable[..., Any])
Hook = Callable[[], Awaitable[None] | None]
Lifespan = Callable[["App"], AbstractAsyncContextManager[Any]]

log = structlog.get_logger("rabbitflow.app")


class App:
    """A rabbitflow application: handlers bound to the queues of a topology file.

    ``topology`` is the path of ``topology.toml`` (``rabbitflow run --topology`` overrides it);
    ``url`` the broker: one URL, or a list of the nodes of one cluster (else ``--url``,
    ``RABBITFLOW_URL``, the file's ``[broker]``). Every URL is validated here.
    ``lifespan`` is an optional ``(app) -> async context manager`` wrapped around the run.
    """

    def __init__(
        self,
        topology: str | Path = "topology.toml",
        *,
        url: str | Sequence[str] | None = None,
        lifespan: Lifespan | None = None,
        name: str = "rabbitflow",
    ) -> None:
        self.topology_path = Path(topology)
        self.urls: list[str] = split_urls(url)
        for each in self.urls:
            validate_url(each)
        self.name = name
        self.lifespan = lifespan
        self.consumers: dict[str, Consumer] = {}
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []
        self._publisher: Publisher | None = None
        self._connection: AbstractConnection | None = None
        self._connect_lock: asyncio.Lock | None = None

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
    ) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``queue``; return it unchanged.

        ``retry_on`` limits delayed retries to these exception types (others are
        dead-lettered); ``dead_letter_on`` dead-letters these types without retrying.
        """

        def register(func: F) -> F:
            self.add_consumer(Consumer(queue, func, tuple(retry_on), tuple(dead_letter_on)))
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

    @contextlib.asynccontextmanager
    async def lifespan_context(self) -> AsyncIterator[None]:
        """Start-up hooks and ``lifespan`` around the run; a failing start-up is fatal."""
        async with contextlib.AsyncExitStack() as stack:
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
    ) -> str:
        """Publish and wait for the broker's confirm; return the ``message_id``.

        Pydantic models and JSON values go as ``application/json``, ``str`` as ``text/plain``,
        ``bytes`` as ``application/octet-stream``. Raises :class:`~rabbitflow.UnroutableError`
        when no queue is bound for the routing key, :class:`~rabbitflow.PublishError` when
        the broker does not confirm.
        """
        publisher = self._publisher
        if publisher is None or not publisher.is_open:
            publisher = await self._own_publisher()
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
            self._publisher = await Publisher.open(underlay(self._connection))
            return self._publisher

    def _file_urls(self) -> list[str]:
        try:
            return list(load_topology(self.topology_path).broker_urls)
        except Exception:
            return []

    async def close(self) -> None:
        """Close the connection ``publish()`` opened, if any."""
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self._publisher = None

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _call_hook(hook: Hook) -> None:
    result = hook()
    if result is not None:
        await result


def _hook_name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", repr(hook))
