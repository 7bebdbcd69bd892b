"""What the overview shows: every work queue of the topology, its retry tiers and its DLQ.

Counts come from passive declares (AMQP ``queue.declare-ok`` carries the ready-message and
consumer counts); AMQP has no unacked count, so that column comes from the management API
when the console is given one (see :mod:`rabbitflow.console.management`), as do the messages
held by the broker's dead-lettering (dead-lettered by a quorum queue, refused by the target
so far, and so in no queue).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from rabbitflow import _headers as h
from rabbitflow._border import broker_call
from rabbitflow._broker_version import BrokerVersion
from rabbitflow._duration import format_duration
from rabbitflow.console._reads import broker_version, reads_are_counted
from rabbitflow.dlq import DeadLetter
from rabbitflow.topology import Topology, derive
from rabbitflow.topology._model import QueueConfig


@dataclass(frozen=True, slots=True)
class Depth:
    """One queue's counts; ``exists`` is False when the queue is not declared on the broker."""

    name: str
    exists: bool
    ready: int = 0
    consumers: int = 0
    unacked: int | None = None
    # Why the counts cannot be read: RabbitMQ 4.3+ answers a passive declare only to a user
    # with a permission on the queue (the on-call user has none on work queues and tiers).
    hidden: str | None = None
    # Held by the broker's dead-lettering (messages_dlx); None without the management API.
    held: int | None = None


@dataclass(frozen=True, slots=True)
class Due:
    """When the head of a retry tier goes back to its queue.

    ``estimated`` is False only for a message whose ``rabbitflow-not-before`` says it."""

    at: datetime
    estimated: bool


@dataclass(frozen=True, slots=True)
class Tier:
    """One retry tier: its delay, what waits in it and when the oldest message is due."""

    delay: str
    depth: Depth
    oldest_due: Due | None
    # Why the oldest due time is not shown although messages wait (no read permission).
    due_unknown: str | None = None


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One work queue of the topology, as the overview shows it."""

    name: str
    queue_type: str
    depth: Depth
    tiers: tuple[Tier, ...]
    dlq: Depth | None


async def read_overview(
    connection: AbstractConnection,
    topology: Topology,
    unacked: dict[str, int] | None = None,
    now: datetime | None = None,
    held: dict[str, int] | None = None,
) -> tuple[QueueRow, ...]:
    """Counts of every queue the topology declares, in file order.

    ``unacked`` and ``held`` map queue names to their unacked counts and to the messages held
    by the broker's dead-lettering, when the management API gave them."""
    now = now or datetime.now(UTC)
    counts = _Counts(unacked, held)
    declarations = derive(topology)
    routes = declarations.routes
    version = broker_version(connection)
    # A look at a tier's head is a delivery; on RabbitMQ 4.0-4.2 the 20th sends a quorum
    # tier's message back to its queue before its delay is up (see rabbitflow.console._reads).
    unread = {
        spec.name
        for spec in declarations.queues
        if spec.role == "retry"
        and reads_are_counted(version, str(spec.arguments.get("x-queue-type")), spec.arguments)
    }
    rows: list[QueueRow] = []
    async with broker_call("reading queue depths"), _Prober(connection) as probe:
        for config in topology.queues.values():
            route = routes[config.name]
            tiers = [
                await _tier(probe, config, delay, name, counts, now, name not in unread)
                for delay, name in sorted(route.tiers.items())
            ]
            dlq = None
            if route.dead_letter_exchange is not None:
                dlq = await probe.depth(f"{config.name}.dlq", counts)
            depth = await probe.depth(config.name, counts)
            rows.append(QueueRow(config.name, config.queue_type, depth, tuple(tiers), dlq))
    return tuple(rows)


async def _tier(
    probe: _Prober,
    config: QueueConfig,
    delay_ms: int,
    name: str,
    counts: _Counts,
    now: datetime,
    readable: bool,
) -> Tier:
    depth = await probe.depth(name, counts)
    label = format_duration(delay_ms)
    if not depth.ready:
        return Tier(label, depth, None)
    if not readable:
        why = "not read: on RabbitMQ 4 each look counts toward the quorum delivery limit"
        return Tier(label, depth, None, why)
    try:
        head = await probe.head(name)
    except aiormq.exceptions.ChannelAccessRefused:
        return Tier(label, depth, None, f"no read permission on {name}")
    due = None if head is None else oldest_due(head, config, delay_ms, now)
    return Tier(label, depth, due)


def oldest_due(head: DeadLetter, config: QueueConfig, delay_ms: int, now: datetime) -> Due:
    """When ``head``, the first message of a tier with ``delay_ms`` TTL, leaves the tier.

    A copy in a tier does not record when it entered it. Its ``rabbitflow-first-failed-at``
    plus the delays of the attempts it went through is that moment if every handler run took
    no time (exact for a first retry), so the estimate is kept between now and now + TTL:
    RabbitMQ expires a tier's messages head first, each one TTL after it arrived."""
    not_before = h.read_epoch(head.headers.get(h.NOT_BEFORE))
    if not_before is not None:
        return Due(datetime.fromtimestamp(not_before, UTC), estimated=False)
    latest = now + timedelta(milliseconds=delay_ms)
    first = head.first_failed_at
    if first is None:
        return Due(latest, estimated=True)
    waited = sum(config.retry.delay_for(n) for n in range(2, max(head.attempt, 2) + 1))
    estimate = first + timedelta(milliseconds=waited)
    return Due(min(max(estimate, now), latest), estimated=True)


@dataclass(frozen=True, slots=True)
class _Counts:
    """What the management API gave per queue (None: nothing to show)."""

    unacked: dict[str, int] | None
    held: dict[str, int] | None

    def of(self, queue: str) -> tuple[int | None, int | None]:
        """``queue``'s unacked and held counts (None for what could not be asked)."""
        unacked = self.unacked.get(queue) if self.unacked is not None else None
        held = self.held.get(queue, 0) if self.held is not None else None
        return unacked, held


class _Prober:
    """Passive declares on one channel; a missing queue closes the channel (404), so a new
    one is opened for the next question."""

    __slots__ = ("_channel", "_connection")

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> _Prober:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def depth(self, queue: str, counts: _Counts) -> Depth:
        async with self._using() as channel:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._channel = None
                return Depth(queue, exists=False)
            except aiormq.exceptions.ChannelAccessRefused:
                self._channel = None
                why = (
                    f"no read permission on {queue}: RabbitMQ 4.3+ does not count it for this user"
                )
                unacked, held = counts.of(queue)
                return Depth(queue, exists=True, hidden=why, unacked=unacked, held=held)
        result = declared.declaration_result
        unacked, held = counts.of(queue)
        return Depth(
            queue,
            exists=True,
            ready=int(result.message_count or 0),
            consumers=int(result.consumer_count or 0),
            unacked=unacked,
            held=held,
        )

    async def head(self, queue: str) -> DeadLetter | None:
        """The first message of ``queue``, given back at once.

        ``basic.get`` without auto-ack, then closing the channel: RabbitMQ requeues the
        unacked message at the head of the queue, where it expires as before. On 4.3+ it is
        nacked first: 4.3 counts a closed channel's delivery as failed, a nack not."""
        channel = await self._connection.channel()
        try:
            target = await channel.get_queue(queue, ensure=False)
            message = await target.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                return None
            version = BrokerVersion.of(self._connection)
            if version is not None and not version.nack_counts:
                await message.nack(requeue=True)
            return DeadLetter.from_delivery(1, message)
        finally:
            if not channel.is_closed:  # a refused basic.get (403) closes the channel
                await channel.close()

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[AbstractChannel]:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        yield self._channel
