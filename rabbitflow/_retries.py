"""What waits in a queue's retry tiers: how many, since when, and when each is due.

Read like ``rabbitflow dlq list``: by a consumer that holds the first messages of each tier
and gives them back in order, so the tiers are left as they were. A message held for the
read does not expire while held; one whose time came meanwhile expires, and goes back to
its work queue, as soon as it is given back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from rabbitflow import _headers as h
from rabbitflow._border import LOST
from rabbitflow._duration import format_duration
from rabbitflow._logging import get_logger
from rabbitflow._metrics import Metrics
from rabbitflow.dlq import _as_int, _reading, _text, ready_count
from rabbitflow.topology._derived import QueueRoutes, dlq_name

# The management API's queue depths of the vhost (see topology.management.queue_depths).
Depths = Callable[[], Awaitable[dict[str, dict[str, int]]]]

log = get_logger("rabbitflow.retries")


@dataclass(frozen=True, slots=True)
class Waiting:
    """One message in a retry tier."""

    message_id: str | None
    attempt: int
    error_type: str | None
    due_at: datetime | None
    not_before: datetime | None

    @classmethod
    def from_delivery(cls, message: AbstractIncomingMessage) -> Waiting:
        headers = message.headers or {}
        return cls(
            message.message_id,
            _as_int(headers.get(h.ATTEMPT), default=1),
            _text(headers.get(h.ERROR_TYPE)),
            h.read_time(headers.get(h.DUE_AT)),
            h.read_time(headers.get(h.NOT_BEFORE)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "attempt": self.attempt,
            "error_type": self.error_type,
            "due_at": _iso(self.due_at),
            "not_before": _iso(self.not_before),
        }


@dataclass(frozen=True, slots=True)
class Tier:
    """A retry tier: its delay, ready-message count and first messages (oldest first)."""

    name: str
    delay_ms: int
    count: int
    messages: tuple[Waiting, ...]

    def overdue(self, now: datetime) -> bool:
        """Whether its oldest message is due by more than one delay (a stuck tier)."""
        due = self.messages[0].due_at if self.messages else None
        return due is not None and (now - due).total_seconds() * 1000 > self.delay_ms

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "tier": self.name,
            "delay": format_duration(self.delay_ms),
            "count": self.count,
            "overdue": self.overdue(now),
            "messages": [message.to_json() for message in self.messages],
        }


async def waiting(
    connection: AbstractConnection, routes: QueueRoutes, *, limit: int = 10
) -> tuple[Tier, ...]:
    """Every tier of ``routes.queue``, shortest delay first, with up to ``limit`` messages."""
    tiers: list[Tier] = []
    for delay, name in sorted(routes.tiers.items()):
        count = await ready_count(connection, name, hint="declare it: rabbitflow topology declare")
        seen: list[Waiting] = []
        if count and limit:
            async with _reading(connection, name, expected=count, window=limit) as reader:
                while len(seen) < limit and (message := await reader.next()) is not None:
                    seen.append(Waiting.from_delivery(message))
        tiers.append(Tier(name, delay, count, tuple(seen)))
    return tuple(tiers)


def render(queue: str, tiers: tuple[Tier, ...], now: datetime) -> list[str]:
    """The text ``rabbitflow retries list`` prints."""
    if not tiers:
        return [f"{queue} has no retry tiers (retry = false)"]
    lines = []
    for tier in tiers:
        noun = "message" if tier.count == 1 else "messages"
        flag = "  OVERDUE: its oldest message is past due" if tier.overdue(now) else ""
        lines.append(f"{tier.name}  ({format_duration(tier.delay_ms)})  {tier.count} {noun}{flag}")
        for message in tier.messages:
            due = _relative(message.due_at, now)
            extra = f"  not before {_iso(message.not_before)}" if message.not_before else ""
            lines.append(
                f"  {message.message_id or '-'}  attempt {message.attempt}  "
                f"{message.error_type or '-'}  due {due}{extra}"
            )
    return lines


def _relative(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "unknown"
    seconds = (when - now).total_seconds()
    if seconds >= 0:
        return f"in {seconds:.0f}s ({_iso(when)})"
    return f"{-seconds:.0f}s ago ({_iso(when)})"


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class TierMonitor:
    """Publishes the depth of every consumed queue's tiers and DLQ as gauges, and warns about
    messages the broker holds in its dead-lettering.

    A quorum queue that dead-letters at-least-once (rabbitflow declares its quorum work
    queues and tiers so) keeps a message it dead-letters until the target confirms it: a
    tier's expired messages until their work queue takes them, a work queue's messages past
    ``crash_limit`` (or a TTL, a length limit) until its DLQ takes them. When the target
    refuses (deleted; a length limit with ``reject-publish``; a policy) the messages are
    *held by the broker's dead-lettering*: in no queue, invisible to every AMQP method, to
    ``dlq list`` and ``retries list`` except through the management API, which counts them
    (``messages_dlx``). Every work queue, tier and DLQ is watched: a queue that holds such
    messages across two samples (a tier: for longer than twice its delay) gets a WARNING
    with the count and for how long, every sample until they are gone, and an INFO when they
    are. Without the management API depths come from passive declares (ready messages only)
    and held messages go unseen (the worker says so once)."""

    __slots__ = ("_depths", "_interval", "_metrics", "_routes", "_since", "_unavailable")

    def __init__(
        self,
        routes: list[QueueRoutes],
        metrics: Metrics,
        *,
        interval: float = 30.0,
        depths: Depths | None = None,
    ) -> None:
        self._routes = routes
        self._metrics = metrics
        self._interval = interval
        self._depths = depths
        self._unavailable = False
        # queue -> monotonic time since when it holds messages in its dead-lettering
        self._since: dict[str, float] = {}

    async def run(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Sample every ``interval`` seconds until cancelled or the connection goes.

        Its channel is left to the connection: closing it would wait for the broker, which
        does not answer while it blocks the connection (a memory alarm)."""
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            while not connection.is_closed:
                if channel is None or channel.is_closed:
                    channel = await connection.channel(publisher_confirms=False)
                await self.sample(channel)
                await asyncio.sleep(self._interval)
        except LOST as exc:
            log.debug("tier monitor stopped", error=repr(exc))

    async def sample(self, channel: aiormq.abc.AbstractChannel) -> None:
        """One round: every consumed queue, its tiers and its DLQ."""
        stats = await self._management()
        for routes in self._routes:
            if stats is not None:
                self._watch(routes.queue, routes.queue, stats.get(routes.queue), _WORK_HELD)
            for delay, tier in routes.tiers.items():
                row = stats.get(tier) if stats is not None else None
                count = _total(row) if row is not None else await _depth(channel, tier)
                if count is None:
                    return  # the channel was closed by a 404: next round, on a new one
                label = format_duration(delay)
                self._metrics.tier_messages.labels(routes.queue, label).set(count)
                self._watch(routes.queue, tier, row, _TIER_HELD, 2 * delay / 1000)
            if routes.dead_letter_exchange is not None:
                name = dlq_name(routes.queue)
                row = stats.get(name) if stats is not None else None
                count = row["messages"] if row is not None else await _depth(channel, name)
                if count is None:
                    return
                self._metrics.dlq_messages.labels(routes.queue).set(count)
                self._watch(routes.queue, name, row, _DLQ_HELD)

    async def _management(self) -> dict[str, dict[str, int]] | None:
        if self._depths is None:
            return None
        try:
            stats = await self._depths()
        except Exception as exc:
            if not self._unavailable:
                log.info(
                    "management API not available: tier depths from passive declares; "
                    "messages held by the broker's dead-lettering not detected",
                    error=str(exc),
                )
            self._unavailable = True
            return None
        self._unavailable = False
        return stats

    def _watch(
        self,
        queue: str,
        name: str,
        row: dict[str, int] | None,
        event: str,
        settle_s: float = 0.0,
    ) -> None:
        """Warn about ``name`` when it has held messages for longer than ``settle_s`` and one
        sample interval (at-least-once dead-lettering normally takes milliseconds)."""
        if row is None:
            return
        held = row["messages_dlx"]
        self._metrics.held_messages.labels(name).set(held)
        now = time.monotonic()
        if held == 0:
            since = self._since.pop(name, None)
            if since is not None:
                log.info(
                    "messages held by the broker's dead-lettering are gone",
                    queue=queue,
                    held_in=name,
                    for_s=round(now - since),
                )
            return
        since = self._since.setdefault(name, now)
        if now - since >= max(settle_s, self._interval):
            log.warning(event, queue=queue, held_in=name, messages=held, for_s=round(now - since))


# What the worker says about each kind of queue holding messages in its dead-lettering.
_TIER_HELD = (
    "messages in a retry tier expired but cannot go back to their queue (deleted? a "
    "policy?): held by the broker's dead-lettering, which retries; declare the topology "
    "again (`rabbitflow topology declare`) or check `rabbitflow topology plan`"
)
_WORK_HELD = (
    "messages dead-lettered by the broker (crash_limit, a TTL, a length limit) are held by "
    "its dead-lettering: the DLQ refuses them (a length limit with reject-publish? a policy? "
    "deleted?) and they are in no queue; make the DLQ accept again and see "
    "docs/recoverability.md#dead-letters-the-broker-holds for how they are released"
)
_DLQ_HELD = (
    "messages of a DLQ are held by the broker's dead-lettering (a policy gave the DLQ a "
    "dead-letter target that refuses them); they are in no queue"
)


def _total(row: dict[str, int]) -> int:
    # The statistics columns are sampled apart: count what waits for dead-lettering even when
    # "messages" does not include it yet.
    return max(row["messages"], row["messages_ready"] + row["messages_dlx"])


async def _depth(channel: aiormq.abc.AbstractChannel, queue: str) -> int | None:
    try:
        declared = await channel.queue_declare(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    return int(declared.message_count or 0)
