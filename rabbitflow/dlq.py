"""Dead-letter queue operations: look at, replay and purge ``Q.dlq`` (contract section 5).

All three take an open aio-pika connection, so they can be used from Python as well as from
``rabbitflow dlq``::

    connection = await rabbitflow.connection.connect(url)
    seen = await peek(connection, "billing.order-created", limit=5)
    report = await replay(connection, "billing.order-created", error_type="PaymentDeclined")

Nothing here interprets a message body: bodies are shown as an escaped text preview, never
decoded by content type and never unpickled.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    ConsumerTag,
)
from pamqp import commands as spec

from rabbitflow import _envelope as envelope
from rabbitflow import _headers as h
from rabbitflow._border import broker_call
from rabbitflow._broker_version import BrokerVersion
from rabbitflow._logging import get_logger
from rabbitflow._publisher import Publisher, copy_properties
from rabbitflow.connection import underlay
from rabbitflow.errors import AccessRefusedError, FrameTooLarge, PublishError, QueueNotFoundError
from rabbitflow.topology import dlq_name

if TYPE_CHECKING:
    from rabbitflow.job import JobBook

log = get_logger("rabbitflow.dlq")

DLQ_SUFFIX = ".dlq"
PREVIEW_BYTES = 120
ERROR_PREVIEW_CHARS = 200
# How long to wait for the next delivery of a message the queue reported as ready. It only
# runs out when someone else consumed or expired messages while we were reading.
DELIVERY_WAIT = 5.0
PUBLISH_TIMEOUT = 30.0
SETTLE_POLL = 0.02
# basic.qos prefetch_count is a 16-bit field; further windows are opened when one is full.
MAX_PREFETCH = 65535
# Prefetch of an unfiltered replay: messages are acked as they go, so this only bounds how
# many are in flight from the broker.
WINDOW = 1000
REPORTED_MESSAGES = 100


def queue_names(queue: str) -> tuple[str, str]:
    """``(work queue, dead-letter queue)`` for a work queue name or its ``.dlq`` name.

    Topology checks forbid declaring a name ending in ``.dlq``, so the suffix is never part of
    a work queue's own name."""
    work = queue.removesuffix(DLQ_SUFFIX)
    return work, dlq_name(work)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message as it sits in a dead-letter queue: properties, headers and a body preview."""

    position: int
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    content_encoding: str | None
    timestamp: datetime | None
    headers: Mapping[str, Any]
    body_size: int
    body_preview: str
    redelivered: bool

    @classmethod
    def from_delivery(cls, position: int, message: AbstractIncomingMessage) -> DeadLetter:
        """Describe ``message``, the ``position``-th (1-based) message of its queue."""
        return cls(
            position=position,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            timestamp=message.timestamp,
            headers=dict(message.headers),
            body_size=len(message.body),
            body_preview=preview(message.body),
            redelivered=bool(message.redelivered),
        )

    @property
    def error_type(self) -> str | None:
        return _text(self.headers.get(h.ERROR_TYPE))

    @property
    def error_message(self) -> str | None:
        return _text(self.headers.get(h.ERROR_MESSAGE))

    @property
    def attempt(self) -> int:
        return _as_int(self.headers.get(h.ATTEMPT), default=1)

    @property
    def replay_count(self) -> int:
        return _as_int(self.headers.get(h.REPLAY_COUNT), default=0)

    @property
    def origin_queue(self) -> str | None:
        return _text(self.headers.get(h.ORIGIN_QUEUE)) or _text(self.death.get("queue"))

    @property
    def first_failed_at(self) -> datetime | None:
        return h.read_time(self.headers.get(h.FIRST_FAILED_AT))

    @property
    def death(self) -> Mapping[str, Any]:
        """The broker's most recent ``x-death`` entry (reason, queue, time), or ``{}``."""
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
            return deaths[0]
        return {}

    @property
    def dead_letter_reason(self) -> str | None:
        """Why the broker dead-lettered it (``rejected``, ``expired``, ``delivery_limit``...)."""
        return _text(self.death.get("reason"))

    def age(self, now: datetime) -> tuple[float | None, str | None]:
        """Seconds since the message failed, and which value that was computed from."""
        for source, when in (
            (h.FIRST_FAILED_AT, self.first_failed_at),
            ("timestamp", self.timestamp),
            ("x-death", h.read_time(self.death.get("time"))),
        ):
            if when is not None:
                return max(0.0, (now - when).total_seconds()), source
        return None, None

    def matches(self, error_type: str | None) -> bool:
        """Whether the message failed with ``error_type`` (qualified or bare class name)."""
        if error_type is None:
            return True
        actual = self.error_type
        if actual is None:
            return False
        wanted = error_type.removeprefix("builtins.")
        actual = actual.removeprefix("builtins.")
        return wanted in (actual, actual.rsplit(".", 1)[-1])

    def to_json(self, now: datetime) -> dict[str, Any]:
        """A JSON-able description (``rabbitflow dlq list --json``)."""
        age, source = self.age(now)
        return {
            "position": self.position,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
            "timestamp": _jsonable(self.timestamp),
            "error_type": self.error_type,
            "error_message": self.error_message,
            "attempt": self.attempt,
            "origin_queue": self.origin_queue,
            "first_failed_at": _jsonable(self.first_failed_at),
            "age_seconds": None if age is None else round(age, 3),
            "age_source": source,
            "replay_count": self.replay_count,
            "dead_letter_reason": self.dead_letter_reason,
            "headers": _jsonable(dict(self.headers)),
            "body_size": self.body_size,
            "body_preview": self.body_preview,
        }


@dataclass(frozen=True, slots=True)
class Peek:
    """What ``peek`` saw: the ready-message count and the first messages, in queue order."""

    queue: str
    dlq: str
    count: int
    messages: tuple[DeadLetter, ...]

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The document ``rabbitflow dlq list --json`` prints."""
        return {
            "queue": self.queue,
            "dlq": self.dlq,
            "count": self.count,
            "messages": [message.to_json(now) for message in self.messages],
        }


@dataclass(frozen=True, slots=True)
class Kept:
    """A message ``replay`` selected but left in the DLQ, and why."""

    message_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What ``replay`` moved (or, with ``dry_run``, would move) and what it left in place.

    ``count`` is the DLQ's ready-message count when the replay started; ``messages``
    describes the first ``REPORTED_MESSAGES`` moved messages only; ``kept`` the selected
    messages that could not be sent back as they are (they stay in the DLQ, in order)."""

    queue: str
    dlq: str
    count: int
    moved: int
    skipped: int
    dry_run: bool
    messages: tuple[DeadLetter, ...]
    kept: tuple[Kept, ...] = ()


async def peek(connection: AbstractConnection, queue: str, *, limit: int = 10) -> Peek:
    """The DLQ's message count and its first ``limit`` messages, leaving the queue as it was."""
    work, dlq = queue_names(queue)
    count = await ready_count(connection, dlq, hint=_missing_dlq_hint(work))
    seen: list[DeadLetter] = []
    async with _reading(connection, dlq, expected=count, window=limit) as reader:
        while len(seen) < limit and (message := await reader.next()) is not None:
            seen.append(DeadLetter.from_delivery(len(seen) + 1, message))
    return Peek(work, dlq, count, tuple(seen))


async def replay(
    connection: AbstractConnection,
    queue: str,
    *,
    limit: int | None = None,
    error_type: str | None = None,
    select: Callable[[DeadLetter], bool] | None = None,
    dry_run: bool = False,
    jobs: JobBook | None = None,
) -> ReplayReport:
    """Move messages from ``Q.dlq`` back to ``Q``, oldest first.

    Each message is published to the default exchange with routing key ``Q`` (so no other queue
    bound to the original exchange gets it again), persistent and mandatory, through the same
    confirming publisher as retries and dead letters; the DLQ copy is acked only once the
    broker has confirmed that publish. A crash in between leaves both copies: a replay can
    duplicate a message, never lose one.

    Only messages that match ``error_type`` (see :meth:`DeadLetter.matches`) and for which
    ``select`` returns true are moved (e.g. ``select=lambda m: m.message_id in wanted``); the
    others stay in the DLQ, in order. ``limit`` bounds how many are moved. Raises
    ``PublishError`` if a publish is returned or refused; that message and all later ones
    stay in the DLQ.

    A dead letter whose headers were moved into its body (a rabbitflow envelope, see
    :mod:`rabbitflow._envelope`) goes back as it was published: headers, content type and
    encoding restored. One that cannot (its restored headers do not fit in a frame of this
    connection, or the envelope is damaged) stays in the DLQ and is listed in ``kept``.

    With ``jobs`` (``app.jobs``, contract section 12) the job of each message moved is
    ``queued`` again once its copy is confirmed; a job store that does not answer is logged
    and leaves the message moved (the worker records the job when it runs it)."""
    work, dlq = queue_names(queue)
    count = await ready_count(connection, dlq, hint=_missing_dlq_hint(work))
    await _check_target(connection, work)
    budget = count if limit is None else min(limit, count)
    picks = _picker(error_type, select)
    # With a filter every message may be examined and the matching ones acked: one consumer
    # sized to the whole DLQ, so that no second window is needed (see _Reader).
    window = count if picks is not None else min(budget, WINDOW)
    moved, skipped = 0, 0
    reported: list[DeadLetter] = []
    kept: list[Kept] = []
    async with (
        _reading(connection, dlq, expected=count, window=window) as reader,
        _publisher(connection, dry_run) as publisher,
    ):
        while moved < budget and (message := await reader.next()) is not None:
            letter = DeadLetter.from_delivery(moved + skipped + 1, message)
            if picks is not None and not picks(letter):
                skipped += 1
                continue
            if publisher is not None:
                refused = await _move(publisher, reader, message, work, moved)
                if refused is not None:
                    kept.append(Kept(message.message_id, refused))
                    continue
                if jobs is not None and message.message_id:
                    await _requeue_job(jobs, message.message_id)
            moved += 1
            if len(reported) < REPORTED_MESSAGES:
                reported.append(letter)
    return ReplayReport(
        work, dlq, count, moved, skipped, dry_run, tuple(reported), kept=tuple(kept)
    )


async def _requeue_job(jobs: JobBook, job_id: str) -> None:
    try:
        await jobs.record_replayed(job_id)
    except Exception as exc:
        log.warning(
            "message replayed, but the job store did not record its job queued",
            job_id=job_id,
            error=str(exc),
        )


def _picker(
    error_type: str | None, select: Callable[[DeadLetter], bool] | None
) -> Callable[[DeadLetter], bool] | None:
    """One predicate for both filters, chosen once; None when every message is moved."""
    if error_type is None:
        return select
    if select is None:
        return lambda letter: letter.matches(error_type)
    return lambda letter: letter.matches(error_type) and select(letter)


async def purge(connection: AbstractConnection, queue: str) -> int:
    """Delete every ready message of ``Q.dlq`` for good; returns how many were deleted.

    Messages a consumer holds unacknowledged at that moment are not ready, so not purged."""
    work, dlq = queue_names(queue)
    await ready_count(connection, dlq, hint=_missing_dlq_hint(work))
    with broker_call(f"purging {dlq!r}"):
        async with _channel(connection) as channel:
            target = await channel.get_queue(dlq, ensure=False)
            result = await target.purge()
    return int(result.message_count or 0)


async def ready_count(connection: AbstractConnection, queue: str, *, hint: str = "") -> int:
    """Ready messages in ``queue``, from a passive declare; ``QueueNotFoundError`` if absent."""
    # A passive declare of a missing queue closes its channel with 404, hence a channel of its own.
    missing = QueueNotFoundError(queue, _vhost(connection), hint)
    with broker_call(f"looking up {queue!r}", missing=missing):
        async with _channel(connection) as channel:
            declared = await channel.declare_queue(queue, passive=True)
    result = declared.declaration_result
    return int(result.message_count or 0)


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers of the copy sent back to the work queue.

    User and trace headers are kept; the failure headers are dropped and the attempt is set
    back to 1, so the message starts a fresh retry cycle (an attempt present tells a later
    failure that the origin headers are rabbitflow's own, not a publisher's); broker ``x-``
    headers are dropped, so ``x-death`` does not grow on every round trip;
    ``rabbitflow-replay-count`` goes up by one. A request's ``rabbitflow-deadline`` is
    dropped: its caller is long gone, and an operator's replay means "run it"."""
    kept = h.carried_headers(headers)
    kept.pop(h.DEADLINE, None)
    kept[h.ATTEMPT] = 1
    kept[h.REPLAY_COUNT] = _as_int(headers.get(h.REPLAY_COUNT), default=0) + 1
    return kept


def replay_properties(message: AbstractIncomingMessage) -> spec.Basic.Properties:
    """The wire properties of the persistent copy that ``replay`` publishes (see
    :func:`rabbitflow._publisher.copy_properties` for what is kept) with
    :func:`replay_headers`."""
    return copy_properties(message.properties, replay_headers(message.headers))


def replay_copy(message: AbstractIncomingMessage) -> tuple[bytes, spec.Basic.Properties]:
    """Body and wire properties of the copy ``replay`` publishes for ``message``.

    A rabbitflow envelope is opened: the body, headers, content type and content encoding
    of the message as it was published come back (``ValueError`` when it is damaged)."""
    if not envelope.is_envelope(message.content_type):
        return message.body, replay_properties(message)
    inner = envelope.unwrap(message.body)
    properties = copy_properties(
        message.properties, replay_headers({**message.headers, **inner.headers})
    )
    properties.content_type = inner.content_type
    properties.content_encoding = inner.content_encoding
    return inner.body, properties


def preview(body: bytes, size: int = PREVIEW_BYTES) -> str:
    """The first ``size`` bytes of ``body`` as one printable line; ``...`` marks a cut."""
    # An incremental decoder drops a multi-byte character cut in half at the end of the head.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    text = escape(decoder.decode(body[:size], final=len(body) <= size))
    return text + "..." if len(body) > size else text


def escape(text: str) -> str:
    """``text`` with newlines, control and other non-printable characters backslash-escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class _Reader:
    """Reads a queue from its head without taking anything off it.

    Messages are consumed with manual acks and left unacked; closing the channel makes
    RabbitMQ requeue them. On RabbitMQ 4.3+ each window first cancels its consumer and gives
    its messages back with one ``basic.nack(0, multiple, requeue)``: 4.3 counts a closed
    channel's deliveries as failed (``x-delivery-count``, which a retry tier's message carries
    to its work queue and its delivery limit there), a nack not; measured on 4.3.6, the
    messages come back in the same order, flagged redelivered, as after a close. Before 4.3
    every return counts, nack or close alike. How they come back depends on the queue type:

    - a classic queue puts each requeued message back at its original position;
    - a quorum queue (RabbitMQ 3.10 and 4.x alike; checked on 3.10.8 and 4.0.5) appends the
      messages of a closed channel's consumer, sorted, to a "returned" list that it delivers
      before every message never delivered so far. Anything else scrambles them: messages
      taken with ``basic.get`` come back unsorted, ``basic.nack`` with requeue sends a
      message to the very back on 3.x and to the head on 4.0+, and messages in flight when a
      consumer is cancelled (``basic.cancel``) move too. None of these is used here.

    So a quorum queue keeps its order only if (1) every message still in the returned list is
    read as well (they all come first and are flagged redelivered: ``close`` reads on while
    the last delivery was a redelivered one); (2) no consumer with spare prefetch is open while
    another channel gives its messages back, or it would take them again (see below); and
    (3) the channels give their messages back one after the other, in the order they were read
    (``close`` waits for the broker to count each batch as ready again before closing the
    next channel; this also means the queue is settled when the operation returns); and (4)
    no delivery is still on its way when the messages are given back. An ack frees the
    consumer's prefetch, so the queue sends the next message at once, and a consumer opened
    on a filter gets the whole queue: a message the queue has sent that has not reached the
    channel yet is missed by the ``basic.nack`` and comes back on its own, at the head, when
    the channel closes (seen on 4.3.6: ``m-4, m-3, m-5`` after moving ``m-1, m-2``). So
    ``close`` first waits until the open window is full or holds every message counted at
    the start.

    One consumer holds at most its prefetch count of unacked messages, a 16-bit field. When it
    is full, another window (channel and consumer) is opened, sized to the messages still to
    come so that it fills up too; nothing is acked in it unless the queue holds more than the
    first window can (then (2) is not guaranteed)."""

    __slots__ = (
        "_active",
        "_connection",
        "_delivered",
        "_expected",
        "_inbox",
        "_last_redelivered",
        "_nack_free",
        "_queue",
        "_size",
        "_taken",
        "_windows",
    )

    def __init__(
        self, connection: AbstractConnection, queue: str, expected: int, window: int
    ) -> None:
        self._connection = connection
        self._queue = queue
        self._expected = expected
        self._size = _prefetch(window)
        self._windows: list[_Window] = []
        self._active: _Window | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._delivered = 0
        self._taken = 0
        self._last_redelivered = False
        version = BrokerVersion.of(connection)
        self._nack_free = version is not None and not version.nack_counts

    async def next(self) -> AbstractIncomingMessage | None:
        """The next message in queue order; None once the messages counted at start are read."""
        if self._taken >= self._expected:
            return None
        if self._inbox.empty() and (self._active is None or self._active.full):
            await self._open_window()
        try:
            message = await asyncio.wait_for(self._inbox.get(), DELIVERY_WAIT)
        except TimeoutError:
            return None
        self._taken += 1
        return message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Remove ``message`` (the one ``next`` returned last) from the queue for good."""
        await message.ack()
        if self._active is not None:
            self._active.held -= 1

    async def close(self) -> None:
        """Give every unacked message back to the broker, in queue order."""
        try:
            while self._last_redelivered and await self.next() is not None:
                pass  # held: see (1) in the class docstring
            await _until(self._in_hand)  # (2) and (4)
            await self._give_back()
        finally:
            for window in self._windows:
                await window.close()

    async def _in_hand(self) -> bool:
        """Every delivery the broker can have sent has arrived: the open window is full, or
        every message counted at the start has been delivered."""
        return self._active is None or self._active.full or self._delivered >= self._expected

    async def _give_back(self) -> None:
        if not self._windows:
            return
        ready = await ready_count(self._connection, self._queue)
        for window in self._windows:
            await window.close()
            if window.held > 0:
                ready += window.held
                await self._until_ready(ready)  # (3)

    async def _until_ready(self, count: int) -> None:
        async def settled() -> bool:
            return await ready_count(self._connection, self._queue) >= count

        await _until(settled)

    async def _open_window(self) -> None:
        size = self._size if not self._windows else _prefetch(self._expected - self._delivered)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=size)
        window = _Window(channel, size)
        self._windows.append(window)
        self._active = window
        queue = await channel.get_queue(self._queue, ensure=False)
        tag = await queue.consume(functools.partial(self._deliver, window), no_ack=False)
        if self._nack_free:
            window.consumer = (queue, tag)

    async def _deliver(self, window: _Window, message: AbstractIncomingMessage) -> None:
        # aio-pika runs one callback task per delivery, in delivery order.
        window.held += 1
        self._delivered += 1
        self._last_redelivered = bool(message.redelivered)
        self._inbox.put_nowait(message)


class _Window:
    """One channel with its consumer, and the unacked deliveries it holds."""

    __slots__ = ("capacity", "channel", "consumer", "held")

    def __init__(self, channel: AbstractChannel, capacity: int) -> None:
        self.channel = channel
        self.capacity = capacity
        self.held = 0
        # Set where a nack is free (RabbitMQ 4.3+): the consumer to cancel before giving back.
        self.consumer: tuple[AbstractQueue, ConsumerTag] | None = None

    @property
    def full(self) -> bool:
        return self.held >= self.capacity

    async def close(self) -> None:
        if self.channel.is_closed:
            return
        if self.consumer is not None:
            # Cancelled first, or the consumer would take the nacked messages again at once.
            queue, tag = self.consumer
            self.consumer = None
            await queue.cancel(tag)
            amqp = await self.channel.get_underlay_channel()
            await amqp.basic_nack(0, multiple=True, requeue=True)
        await self.channel.close()


def _prefetch(count: int) -> int:
    return max(1, min(count, MAX_PREFETCH))


async def _until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``condition`` until it holds or ``DELIVERY_WAIT`` has passed (best effort: it only
    fails to hold when someone else consumes or expires messages meanwhile)."""
    for _ in range(round(DELIVERY_WAIT / SETTLE_POLL)):
        if await condition():
            return
        await asyncio.sleep(SETTLE_POLL)


@contextlib.asynccontextmanager
async def _reading(
    connection: AbstractConnection, queue: str, *, expected: int, window: int
) -> AsyncIterator[_Reader]:
    reader = _Reader(connection, queue, expected, window)
    with broker_call(f"reading {queue!r}"):
        try:
            yield reader
        except BaseException:
            # The first error is the one to report; the broker requeues whatever a failed
            # close leaves behind when the connection goes.
            with contextlib.suppress(Exception):
                await reader.close()
            raise
        await reader.close()


@contextlib.asynccontextmanager
async def _publisher(
    connection: AbstractConnection, dry_run: bool
) -> AsyncIterator[Publisher | None]:
    if dry_run:
        yield None
        return
    # The publisher of retries and dead letters: confirms, and a mandatory publish that no
    # queue takes (basic.return) fails instead of being confirmed.
    with broker_call("publishing"):
        publisher = await Publisher.open(underlay(connection))
    try:
        yield publisher
    finally:
        with contextlib.suppress(Exception):
            await publisher.close()


async def _move(
    publisher: Publisher,
    reader: _Reader,
    message: AbstractIncomingMessage,
    work: str,
    moved: int,
) -> str | None:
    """Publish ``message``'s copy to ``work`` and ack it; why not, when it cannot be sent
    back as it was (it stays in the DLQ)."""
    try:
        body, properties = replay_copy(message)
    except ValueError as exc:
        return str(exc)
    try:
        await publisher.send_fitted(
            "", work, body, properties, h.REPLAY_TRIMMABLE, timeout=PUBLISH_TIMEOUT
        )
    except FrameTooLarge as exc:
        why = (
            f"its headers take a {exc.size}-byte frame, over this connection's frame_max of "
            f"{exc.frame_max} bytes"
        )
        if envelope.is_envelope(message.content_type):
            why += f"; they stay in its body ({envelope.CONTENT_TYPE}): consume it from the DLQ"
        return why
    except PublishError as exc:
        ident = f"message {message.message_id!r}" if message.message_id else "the next message"
        stopped = f"stopped after moving {moved}, {ident} and the rest stay in the DLQ"
        raise PublishError(
            exc.exchange, exc.routing_key, f"{exc.reason}; {stopped}", missing=exc.missing
        ) from None
    await reader.ack(message)
    return None


@contextlib.asynccontextmanager
async def _channel(
    connection: AbstractConnection, **options: Any
) -> AsyncIterator[AbstractChannel]:
    channel = await connection.channel(**options)
    try:
        yield channel
    finally:
        if not channel.is_closed:
            await channel.close()


async def _check_target(connection: AbstractConnection, work: str) -> None:
    # Fail early, naming the queue, when the replay's target is missing. RabbitMQ 4.3+ lets
    # a passive declare through only to a user with a permission on the queue, which the
    # on-call user lacks on work queues: then the mandatory publish is the check (a message
    # no queue takes is returned and stays in the DLQ).
    with contextlib.suppress(AccessRefusedError):
        await ready_count(
            connection, work, hint="replay moves messages back to it; declare it first"
        )


def _missing_dlq_hint(work: str) -> str:
    return (
        f"{work!r} has no dead-letter queue here; check the queue name and the vhost of the "
        "URL, or declare the topology with dead_letter = true"
    )


def _vhost(connection: AbstractConnection) -> str:
    # aio_pika.Connection keeps its yarl URL (path already unquoted); the ABC does not declare it.
    path = getattr(getattr(connection, "url", None), "path", "/")
    return str(path).removeprefix("/") or "/"


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return None if value is None else str(value)


def _as_int(value: Any, *, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    try:
        return int(_text(value) or "")
    except ValueError:
        return default


def _jsonable(value: Any) -> Any:
    """AMQP field values (bytes, datetimes, decimals, nested tables) as JSON values."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray):
        return _text(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return str(value)
