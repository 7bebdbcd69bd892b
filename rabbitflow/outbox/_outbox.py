"""``PostgresOutbox``: what ``App(outbox=...)`` holds, and what ``app.outbox`` offers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from rabbitflow._duration import parse_duration
from rabbitflow._logging import get_logger
from rabbitflow._urls import mask_url
from rabbitflow.errors import ConfigurationError
from rabbitflow.job import Job
from rabbitflow.outbox._row import build_message
from rabbitflow.outbox._schema import DEFAULT_TABLE, Statements, check_identifier, ddl
from rabbitflow.outbox._writer import write

if TYPE_CHECKING:
    from rabbitflow._metrics import Metrics
    from rabbitflow.app import App
    from rabbitflow.outbox._relay import Relay

log = get_logger("rabbitflow.outbox")

CONNECT_TIMEOUT = 5  # seconds, for the relay's and the operations' own connections


class PostgresOutbox:
    """A transactional outbox in one PostgreSQL table (``pip install 'rabbitflow[postgres]'``).

    ``dsn`` is where the relay and ``rabbitflow outbox`` connect (the writes go through the
    caller's own connection); ``table`` (and ``schema``, default the search path) names the
    table, created by ``rabbitflow outbox install`` or :meth:`install`.

    The relay's settings: ``batch_size`` rows per claim; ``lease``, how long a claimed row is
    kept from other relays (a relay that dies leaves its batch to them after it);
    ``poll_interval``, the longest sleep without a NOTIFY (``notify=False``: the only wake-up);
    ``retention``, how long sent rows are kept (0: deleted at the confirm); ``max_attempts``
    refusals before a row is parked, retried after ``retry_backoff`` doubled each time up to
    ``retry_backoff_max``; ``lag_warning``, the age of the oldest pending row that logs a
    WARNING; ``publish_timeout``, the wait for a batch's confirms; ``shutdown_timeout``, what
    the relay gets to finish its batch when the run stops. Durations are ``"30s"``-style
    strings or seconds."""

    def __init__(
        self,
        dsn: str,
        *,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        batch_size: int = 500,
        lease: str | float = "30s",
        poll_interval: str | float = "1s",
        retention: str | float = "1d",
        max_attempts: int = 10,
        retry_backoff: str | float = "1s",
        retry_backoff_max: str | float = "5m",
        lag_warning: str | float = "60s",
        publish_timeout: str | float = "20s",
        shutdown_timeout: str | float = "10s",
        notify: bool = True,
    ) -> None:
        self.dsn = dsn
        self.table = check_identifier(table)
        self.schema = None if schema is None else check_identifier(schema, "schema")
        if batch_size < 1 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be at least 1")
        self.batch_size = batch_size
        self.lease = _seconds(lease, "lease")
        self.poll_interval = _seconds(poll_interval, "poll_interval")
        self.retention = _seconds(retention, "retention", zero=True)
        self.max_attempts = max_attempts
        self.retry_backoff = _seconds(retry_backoff, "retry_backoff", zero=True)
        self.retry_backoff_max = _seconds(retry_backoff_max, "retry_backoff_max", zero=True)
        self.lag_warning = _seconds(lag_warning, "lag_warning")
        self.publish_timeout = _seconds(publish_timeout, "publish_timeout")
        self.shutdown_timeout = _seconds(shutdown_timeout, "shutdown_timeout", zero=True)
        if self.publish_timeout >= self.lease:
            # A batch still waiting for its confirms when its lease ends would be claimed and
            # published again by another relay.
            raise ConfigurationError(
                f"PostgresOutbox(publish_timeout={publish_timeout!r}) must be shorter than "
                f"the lease ({lease!r})"
            )
        self.notify = notify
        self.statements = Statements.build(self.table, self.schema)
        self._app: App | None = None  # the App this outbox belongs to (App(outbox=...))
        self._psycopg = _client()
        self.db_errors: tuple[type[BaseException], ...] = (self._psycopg.Error, OSError)

    def __repr__(self) -> str:
        return f"PostgresOutbox({mask_url(self.dsn)!r}, table={self.statements.table!r})"

    # -- writing -------------------------------------------------------------------------

    async def publish(
        self,
        connection: Any,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        message_id: str | None = None,
        key: str | None = None,
        headers: dict[str, Any] | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        priority: int | None = None,
        expiration: int | None = None,
        reply_to: str | None = None,
        delay: str | int | timedelta | None = None,
    ) -> str:
        """Write the message into the outbox on ``connection``, in its transaction; return
        its ``message_id``.

        ``connection`` is a psycopg 3 ``AsyncConnection`` or a SQLAlchemy 2 ``AsyncSession``
        (or ``AsyncConnection``). Once the transaction commits, the relay publishes the
        message at least once, encoded as :meth:`App.publish` would, with mandatory routing
        and publisher confirms; rolled back, it is never published. Messages with the same
        ``key`` are published in commit order (transactions writing one key take turns from
        this call until they end). ``message_id`` (default: a new one) is what an idempotent
        consumer recognises a relay's duplicate by. ``delay`` (``"10m"``, milliseconds or a
        ``timedelta``) delivers it to its handler no earlier than that after this write, as
        :meth:`App.publish` does."""
        message = build_message(
            exchange,
            routing_key,
            payload,
            message_id=message_id,
            key=key,
            headers=headers,
            correlation_id=correlation_id,
            content_type=content_type,
            persistent=persistent,
            priority=priority,
            expiration=expiration,
            reply_to=reply_to,
            delay=delay,
        )
        await write(connection, self.statements, message)
        return message.message_id

    async def enqueue(
        self,
        connection: Any,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        job_id: str | None = None,
        key: str | None = None,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
        delay: str | int | timedelta | None = None,
    ) -> Job:
        """Enqueue a job through the outbox, in the caller's transaction (contract section
        12): committed, the job is published and exists; rolled back, it never does.

        The arguments are those of :meth:`App.enqueue` plus ``connection`` and ``key``;
        ``job_id`` (default: a new one) is the message's ``message_id``. Returns the
        :class:`~rabbitflow.job.Job` at once; the relay records it ``queued`` once the broker
        confirmed it, unless a worker already recorded a later state. Needs
        ``App(jobs=...)``."""
        app = self._app
        if app is None:
            raise ConfigurationError(
                "app.outbox.enqueue() needs the outbox to belong to an App: "
                "App(outbox=PostgresOutbox(...), jobs=...)"
            )
        book = app.jobs  # ConfigurationError without App(jobs=...)
        job_id = job_id or uuid.uuid4().hex
        message = build_message(
            exchange,
            routing_key,
            payload,
            message_id=job_id,
            key=key,
            headers=headers,
            priority=priority,
            job=True,
            delay=delay,
        )
        await write(connection, self.statements, message)
        return Job(job_id, book)

    def bind(self, app: App) -> None:
        """Called by ``App(outbox=...)``: the app whose jobs :meth:`enqueue` records."""
        self._app = app

    # -- the table -----------------------------------------------------------------------

    def ddl(self) -> str:
        """The SQL that creates the table, for a migration tool (Alembic: ``op.execute``)."""
        return ddl(self.table, self.schema)

    async def install(self) -> None:
        """Create the table, its indexes and its trigger (idempotent)."""
        connection = await self.connect()
        async with connection:
            if self.schema is not None:
                await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            await connection.execute(self.ddl())

    async def connect(self) -> Any:
        """A new autocommit psycopg ``AsyncConnection`` to ``dsn``."""
        connection = await self._psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
        )
        return connection

    # -- the relay -----------------------------------------------------------------------

    def relay(self, app: App, metrics: Metrics | None = None) -> Relay:
        """A relay publishing this outbox's rows through ``app``."""
        from rabbitflow.outbox._relay import Relay

        return Relay(self, app, metrics)

    @contextlib.asynccontextmanager
    async def relaying(self, app: App, metrics: Metrics | None = None) -> AsyncIterator[Relay]:
        """A relay running for as long as the block: ``rabbitflow run`` wraps its consumers
        in it. On exit the relay finishes and settles its batch within ``shutdown_timeout``;
        a batch cut short is published again by the next relay after its lease."""
        relay = self.relay(app, metrics)
        task = asyncio.ensure_future(relay.run())
        try:
            yield relay
        finally:
            relay.stop()
            done, _ = await asyncio.wait([task], timeout=self.shutdown_timeout)
            if not done:
                log.warning(
                    "outbox relay did not stop in time; its batch waits for its lease",
                    table=self.table,
                    after_s=self.shutdown_timeout,
                )
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            elif not task.cancelled() and task.exception() is not None:
                log.error("outbox relay failed", error=repr(task.exception()))


def _seconds(value: str | float, name: str, *, zero: bool = False) -> float:
    try:
        seconds = value / 1 if isinstance(value, int | float) else parse_duration(value) / 1000
    except ValueError as exc:
        raise ConfigurationError(f"PostgresOutbox({name}=...): {exc}") from None
    if seconds < 0 or (seconds == 0 and not zero):
        raise ConfigurationError(f"PostgresOutbox({name}=...) must be positive, not {value!r}")
    return float(seconds)


def _client() -> Any:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "PostgresOutbox needs psycopg: pip install 'rabbitflow[postgres]'"
        ) from None
    return psycopg
