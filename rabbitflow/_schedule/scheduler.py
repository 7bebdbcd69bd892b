"""Running the schedules of an app inside a worker process.

Every process that serves the app runs a :class:`Scheduler`; for each schedule, the one that
holds its :class:`~rabbitflow.schedule.lease.Lease` publishes and the others stand by,
retrying the lease. The scheduler has a connection of its own: the lease belongs to the
connection that publishes, so a process that lost its connection (and with it the lease)
cannot publish a tick that its successor publishes too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime

import aiormq
import aiormq.abc

from rabbitflow import _clock as clock
from rabbitflow._logging import get_logger
from rabbitflow._publisher import Publisher
from rabbitflow._schedule.entry import Schedule
from rabbitflow._schedule.lease import Lease
from rabbitflow._schedule.timing import period_s
from rabbitflow.connection import connect, underlay
from rabbitflow.errors import PublishError, RabbitflowError, UnroutableError

log = get_logger("rabbitflow.schedule")

MIN_POLL_S = 0.2
MAX_POLL_S = 5.0
RECONNECT_S = 1.0
REFUSED_S = 30.0
# Lost-connection errors: the lease went with the connection; stand by and try again.
_LOST = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, PublishError)


def poll_interval(schedule: Schedule) -> float:
    """How often a standby process retries the lease: a tenth of the period, 0.2s to 5s."""
    period = period_s(schedule.timing, clock.utcnow())
    return min(MAX_POLL_S, max(MIN_POLL_S, period / 10))


def first_tick(schedule: Schedule, last: datetime | None, now: datetime) -> datetime:
    """The tick to publish first after taking the lease.

    Never one before ``now`` that was already published; a tick that came due while no one
    held the lease is published at once, late (several missed ticks make one). A schedule
    never published before starts at its next tick."""
    if last is None:
        return schedule.timing.after(now)
    due = schedule.timing.latest(now)
    return due if due > last else schedule.timing.after(max(last, now))


class Scheduler:
    """Publishes the ticks of ``schedules`` from this process while it holds their leases."""

    def __init__(
        self,
        schedules: Iterable[Schedule],
        url: str | Sequence[str],
        *,
        name: str = "rabbitflow",
        poll: float | None = None,
    ) -> None:
        self.schedules = list(schedules)
        self.url = url
        self.name = name
        self.poll = poll
        self.published = 0

    async def run(self) -> None:
        """Connect, compete for the leases and publish, until cancelled; reconnects."""
        while True:
            try:
                connection = await connect(self.url, name=f"{self.name}-scheduler")
            except RabbitflowError as exc:
                log.warning("scheduler cannot connect; retrying", error=str(exc))
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                await self._serve(underlay(connection))
            except aiormq.exceptions.ChannelAccessRefused as exc:
                log.error(
                    "the scheduler may not use its queues: grant configure, write and read "
                    "on rabbitflow.schedule.*; retrying in 30s",
                    error=str(exc),
                )
                await asyncio.sleep(REFUSED_S)
            except _LOST as exc:
                log.warning("scheduler connection lost; standing by", error=repr(exc))
            except Exception:
                log.exception("scheduler failed; restarting it")
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.close())
            await asyncio.sleep(RECONNECT_S)

    async def _serve(self, amqp: aiormq.abc.AbstractConnection) -> None:
        publisher = await Publisher.open(amqp)
        tasks = [asyncio.create_task(self._run_one(amqp, publisher, s)) for s in self.schedules]
        closing = asyncio.ensure_future(_closed(amqp))
        try:
            done, _ = await asyncio.wait([*tasks, closing], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in [*tasks, closing]:
                task.cancel()
            await asyncio.gather(*tasks, closing, return_exceptions=True)

    async def _run_one(
        self, amqp: aiormq.abc.AbstractConnection, publisher: Publisher, schedule: Schedule
    ) -> None:
        lease = Lease(amqp, schedule.name)
        poll = self.poll if self.poll is not None else poll_interval(schedule)
        # Polling is the only way: RabbitMQ does not tell anyone when an exclusive queue goes.
        while not await lease.try_acquire():  # noqa: ASYNC110
            await asyncio.sleep(poll)
        last = await lease.last_tick()
        tick = first_tick(schedule, last, clock.utcnow())
        log.info(
            "holding the schedule's lease; this process publishes it",
            schedule=schedule.name,
            timing=schedule.timing.describe(),
            next_tick=tick.isoformat(),
        )
        while True:
            await _sleep_until(tick)
            await self._fire(publisher, lease, schedule, tick)
            tick = _next(schedule, tick)

    async def _fire(
        self, publisher: Publisher, lease: Lease, schedule: Schedule, tick: datetime
    ) -> None:
        try:
            payload = await schedule.produce()
        except Exception:
            log.exception("scheduled function failed; tick skipped", schedule=schedule.name)
            payload = None
        if payload is not None:
            try:
                message_id = await schedule.publish(publisher, tick, payload)
            except UnroutableError as exc:
                log.error("tick not published: unroutable", schedule=schedule.name, error=str(exc))
            else:
                self.published += 1
                log.info("tick published", schedule=schedule.name, message_id=message_id)
        # Recorded only after the confirm: a successor republishes a tick whose record is
        # missing (same message_id, so an idempotent consumer drops the copy).
        await lease.record(publisher, tick)


def _next(schedule: Schedule, tick: datetime) -> datetime:
    following = schedule.timing.after(tick)
    now = clock.utcnow()
    if following > now:
        return following
    log.warning(
        "ticks missed while the scheduled function ran; publishing the latest",
        schedule=schedule.name,
    )
    return schedule.timing.latest(now)


async def _sleep_until(moment: datetime) -> None:
    # asyncio sleeps on the monotonic clock; checking the wall clock after each sleep makes
    # sure a tick is never published before its time, even if the two drift apart.
    while (remaining := (moment - clock.utcnow()).total_seconds()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(min(remaining + 0.001, 60.0))


async def _closed(amqp: aiormq.abc.AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.shield(amqp.closing)
    raise ConnectionError("the scheduler's connection closed")


@contextlib.asynccontextmanager
async def run_schedules(
    schedules: Iterable[Schedule], url: str | Sequence[str], *, name: str = "rabbitflow"
) -> AsyncIterator[Scheduler | None]:
    """Run a :class:`Scheduler` for ``schedules`` (if any) in the background of the block."""
    listed = list(schedules)
    if not listed:
        yield None
        return
    scheduler = Scheduler(listed, url, name=name)
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
