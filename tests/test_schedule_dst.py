"""Cron schedules across daylight-saving changes: Vixie-cron semantics, in three zones.

A fixed-time expression (minute and hour not starting with ``*``) fires each matching
wall-clock time once a day: a skipped time at the end of the jump, a repeated one the first
time. A wildcard expression fires at every real instant whose wall-clock time matches. The
expected ticks are computed here by brute force, minute by minute, independently of
``Cron``'s change-to-change walk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import aio_pika
import pytest
from croniter import croniter  # type: ignore[import-untyped]

from rabbitflow import App
from rabbitflow._schedule import Cron, Schedule, Scheduler
from rabbitflow._schedule import scheduler as scheduler_module
from rabbitflow._schedule.scheduler import first_tick
from rabbitflow.testing._clock import VirtualClock, wall_clock
from tests.support.amqp import drain_async

MINUTE = timedelta(minutes=1)

# (zone, the local date of the change, clocks go forward?)
TRANSITIONS = [
    ("America/New_York", date(2025, 3, 9), True),  # 02:00 EST -> 03:00 EDT
    ("America/New_York", date(2025, 11, 2), False),  # 02:00 EDT -> 01:00 EST
    ("Europe/Berlin", date(2026, 3, 29), True),  # 02:00 CET -> 03:00 CEST
    ("Europe/Berlin", date(2026, 10, 25), False),  # 03:00 CEST -> 02:00 CET
    ("Australia/Sydney", date(2025, 10, 5), True),  # 02:00 AEST -> 03:00 AEDT
    ("Australia/Sydney", date(2025, 4, 6), False),  # 03:00 AEDT -> 02:00 AEST
]
IDS = [f"{zone}-{day}-{'forward' if fwd else 'back'}" for zone, day, fwd in TRANSITIONS]

EXPRESSIONS = [
    "0 1 * * *",  # fixed: repeated in New York's fall-back night
    "30 2 * * *",  # fixed: skipped when clocks go forward, repeated in Berlin/Sydney's fall back
    "0,30 2 * * *",  # fixed: two times in one skipped hour
    "59 1 * * 0",  # fixed, on a weekday: the minute before New York's change
    "*/30 * * * *",  # wildcard: every real half hour
    "0 * * * *",  # wildcard hour
    "*/10 2 * * *",  # wildcard minute in a fixed hour: Vixie calls it wildcard
    "15 */2 * * *",  # wildcard hour with a step
]


def _window(zone: str, day: date) -> tuple[datetime, datetime]:
    """From noon the day before the change to noon the day after, as UTC instants."""
    tz = ZoneInfo(zone)
    start = datetime.combine(day - timedelta(days=1), datetime.min.time().replace(hour=12), tz)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time().replace(hour=12), tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def _instants(start: datetime, end: datetime, step: timedelta = MINUTE) -> Iterator[datetime]:
    at = start
    while at <= end:
        yield at
        at += step


def _exists(wall: datetime, tz: ZoneInfo) -> bool:
    back = wall.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None)
    return back == wall


def _matching_walls(expression: str, first: datetime, last: datetime) -> list[datetime]:
    """The naive wall-clock minutes in [first, last] that the expression names."""
    walls = croniter(expression, first - timedelta(microseconds=1))
    found: list[datetime] = []
    while (wall := walls.get_next(datetime)) <= last:
        found.append(wall)
    return found


def _expected(expression: str, zone: str, start: datetime, end: datetime) -> list[datetime]:
    """Every tick in [start, end], by the rule, from every minute of the window."""
    tz = ZoneInfo(zone)
    minute, hour = expression.split()[:2]
    wildcard = minute.startswith("*") or hour.startswith("*")
    first = start.astimezone(tz).replace(tzinfo=None) - timedelta(hours=3)
    last = end.astimezone(tz).replace(tzinfo=None) + timedelta(hours=3)
    walls = _matching_walls(expression, first, last)
    ticks: set[datetime] = set()
    if wildcard:
        named = set(walls)
        for at in _instants(start, end):
            if at.astimezone(tz).replace(tzinfo=None) in named:
                ticks.add(at)
        return sorted(ticks)
    # Fixed: every matching wall-clock minute of the window's local days, once each.
    for wall in walls:
        if _exists(wall, tz):
            at = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
        else:  # skipped by the change: at the change, the first instant after the gap
            at = next(
                i
                for i in _instants(start, end + timedelta(hours=3))
                if i.astimezone(tz).replace(tzinfo=None) > wall
            )
        if start <= at <= end:
            ticks.add(at)
    return sorted(ticks)


def _chain(cron: Cron, start: datetime, end: datetime) -> list[datetime]:
    ticks = []
    at = cron.after(start - timedelta(microseconds=1))
    while at <= end:
        ticks.append(at)
        at = cron.after(at)
    return ticks


@pytest.mark.parametrize("expression", EXPRESSIONS)
@pytest.mark.parametrize(("zone", "day", "forward"), TRANSITIONS, ids=IDS)
def test_ticks_across_a_change_follow_the_rule(
    zone: str, day: date, forward: bool, expression: str
) -> None:
    start, end = _window(zone, day)
    cron = Cron(expression, timezone=zone)
    expected = _expected(expression, zone, start, end)
    assert _chain(cron, start, end) == expected
    # latest() agrees every 7 minutes of the window, and around each tick
    probes = set(_instants(start + timedelta(hours=6), end, step=timedelta(minutes=7)))
    for tick in expected:
        probes |= {tick - timedelta(seconds=1), tick, tick + timedelta(seconds=59)}
    for at in sorted(probes):
        due = [tick for tick in expected if tick <= at]
        if due and at <= end:
            assert cron.latest(at) == due[-1], at


@pytest.mark.parametrize(("zone", "day", "forward"), TRANSITIONS, ids=IDS)
def test_a_daily_fixed_time_fires_once_on_the_night_of_the_change(
    zone: str, day: date, forward: bool
) -> None:
    tz = ZoneInfo(zone)
    for expression in ("0 1 * * *", "30 2 * * *", "0 3 * * *"):
        cron = Cron(expression, timezone=zone)
        start, end = _window(zone, day)
        days = [tick.astimezone(tz).date() for tick in _chain(cron, start, end)]
        assert days.count(day) == 1, (expression, days)


def test_new_york_fall_back_fires_one_am_once() -> None:
    # The issue: 0 1 * * * fired at 05:00Z (01:00 EDT) and again at 06:00Z (01:00 EST).
    nightly = Cron("0 1 * * *", timezone="America/New_York")
    first = nightly.after(datetime(2025, 11, 1, 12, tzinfo=UTC))
    assert first == datetime(2025, 11, 2, 5, 0, tzinfo=UTC)
    assert nightly.after(first) == datetime(2025, 11, 3, 6, 0, tzinfo=UTC)
    # In the repeated hour the latest tick is still the first 01:00
    assert nightly.latest(datetime(2025, 11, 2, 6, 30, tzinfo=UTC)) == first


def test_berlin_spring_forward_runs_the_skipped_time_at_the_end_of_the_jump() -> None:
    # 02:30 does not exist on 29 March 2026 in Berlin: it runs at 03:00 CEST (01:00Z), once,
    # as Vixie cron and cronie run a fixed-time job of a skipped hour.
    cron = Cron("30 2 * * *", timezone="Europe/Berlin")
    tick = cron.after(datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert tick == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    local = tick.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (3, 0)
    assert cron.after(tick) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)  # 02:30 CEST


@pytest.mark.parametrize(("zone", "day", "forward"), TRANSITIONS, ids=IDS)
def test_every_half_hour_is_every_real_half_hour(zone: str, day: date, forward: bool) -> None:
    # Neither skipped nor doubled: ticks are 30 real minutes apart through the change, and
    # the night has 23 or 25 hours' worth of them.
    cron = Cron("*/30 * * * *", timezone=zone)
    tz = ZoneInfo(zone)
    midnight = datetime.combine(day, datetime.min.time(), tz).astimezone(UTC)
    next_midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), tz)
    ticks = _chain(cron, midnight, next_midnight.astimezone(UTC) - MINUTE)
    assert {b - a for a, b in itertools.pairwise(ticks)} == {timedelta(minutes=30)}
    assert len(ticks) == (46 if forward else 50)


@pytest.mark.parametrize(("zone", "day", "forward"), TRANSITIONS, ids=IDS)
def test_tick_ids_name_one_real_instant_each(zone: str, day: date, forward: bool) -> None:
    app = App(topology="unused.toml")
    app.cron("*/30 * * * *", exchange="", routing_key="q", name="half", timezone=zone)(lambda: None)
    app.cron("30 2 * * *", exchange="", routing_key="q", name="nightly", timezone=zone)(
        lambda: None
    )
    start, end = _window(zone, day)
    for schedule in app.schedules.values():
        assert isinstance(schedule.timing, Cron)
        ticks = _chain(schedule.timing, start, end)
        ids = [schedule.tick_id(tick) for tick in ticks]
        assert len(set(ids)) == len(ids)
        assert all(tick_id.endswith("Z") for tick_id in ids)


def test_a_publisher_taking_over_in_the_repeated_hour_does_not_fire_it_again() -> None:
    # The leader published 01:00 EDT (05:00Z) and died; a successor takes the lease at 01:10
    # EST (06:10Z). 01:00 EST is the same wall-clock time: a fixed-time schedule must not
    # publish it (a wildcard one publishes its next real half hour, 06:30Z).
    app = App(topology="unused.toml")
    app.cron(
        "0 1 * * *", exchange="", routing_key="q", name="nightly", timezone="America/New_York"
    )(lambda: None)
    app.cron(
        "*/30 * * * *", exchange="", routing_key="q", name="half", timezone="America/New_York"
    )(lambda: None)
    now = datetime(2025, 11, 2, 6, 10, tzinfo=UTC)
    nightly, half = app.schedules["nightly"], app.schedules["half"]
    assert first_tick(nightly, datetime(2025, 11, 2, 5, tzinfo=UTC), now) == datetime(
        2025, 11, 3, 6, tzinfo=UTC
    )
    assert first_tick(half, datetime(2025, 11, 2, 6, tzinfo=UTC), now) == datetime(
        2025, 11, 2, 6, 30, tzinfo=UTC
    )
    # The one that died before 01:00 EDT: the missed tick is published now, late, once.
    assert first_tick(nightly, datetime(2025, 11, 1, 5, tzinfo=UTC), now) == datetime(
        2025, 11, 2, 5, tzinfo=UTC
    )


def test_utc_and_fixed_offset_zones_are_plain_cron() -> None:
    cron = Cron("*/15 * * * *")
    at = datetime(2026, 1, 1, 0, 7, tzinfo=UTC)
    assert cron.after(at) == datetime(2026, 1, 1, 0, 15, tzinfo=UTC)
    assert cron.latest(at) == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    yearly = Cron("0 0 1 1 *", timezone="Etc/GMT-3")
    assert yearly.after(at) == datetime(2026, 12, 31, 21, 0, tzinfo=UTC)
    assert yearly.latest(at) == datetime(2025, 12, 31, 21, 0, tzinfo=UTC)


# The scheduler itself, on the real broker, through a whole night of each change: its wall
# clock is a VirtualClock that jumps to each tick when the scheduler sleeps until it.


class _Night:
    """Runs a Scheduler on a virtual clock until it waits for a tick past ``until``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: datetime) -> None:
        self.clock = VirtualClock(start=start.timestamp())
        self._start = start
        self.until = start
        self._parked = asyncio.Event()
        monkeypatch.setattr(scheduler_module, "_sleep_until", self._jump)

    def set(self, moment: datetime) -> None:
        self.clock.advance_to((moment - self._start).total_seconds() * 1000)

    async def _jump(self, moment: datetime) -> None:
        if moment > self.until:
            self._parked.set()
            await asyncio.Event().wait()
        self.set(moment)

    async def run(self, schedule: Schedule, url: str, until: datetime) -> None:
        self.until = until
        self._parked.clear()
        with wall_clock(self.clock):
            scheduler = Scheduler([schedule], url, name="dst-test", poll=0.05)
            task = asyncio.create_task(scheduler.run())
            try:
                await asyncio.wait_for(self._parked.wait(), timeout=60)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


@pytest.mark.broker
@pytest.mark.parametrize(("zone", "day", "forward"), TRANSITIONS, ids=IDS)
async def test_the_scheduler_publishes_each_tick_of_the_night_once(
    vhost_url: str, monkeypatch: pytest.MonkeyPatch, zone: str, day: date, forward: bool
) -> None:
    # Given a fixed-time and a wildcard schedule publishing into a queue
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue("ticks")
    finally:
        await connection.close()
    start, end = _window(zone, day)
    for name, expression in (("nightly", "30 2 * * *"), ("half", "*/30 * * * *")):
        schedule = Schedule(name, Cron(expression, timezone=zone), lambda: {"n": 1}, "", "ticks")
        # When the scheduler runs from noon the day before to noon the day after, its
        # publisher dying in the middle of the night (the change's hour) and another
        # taking over ten minutes later
        night = _Night(monkeypatch, start)
        change = _change(zone, start, end)
        await night.run(schedule, vhost_url, until=change + timedelta(minutes=15))
        night.set(change + timedelta(minutes=25))
        await night.run(schedule, vhost_url, until=end)

        # Then each tick of the rule reached the queue once, under its own id
        got = [message.message_id for message in await drain_async(vhost_url, "ticks")]
        expected = [schedule.tick_id(tick) for tick in _expected(expression, zone, start, end)]
        assert got == [tick_id for tick_id in expected if tick_id != schedule.tick_id(start)]


def _change(zone: str, start: datetime, end: datetime) -> datetime:
    tz = ZoneInfo(zone)
    return next(
        at
        for at in _instants(start, end)
        if at.astimezone(tz).utcoffset() != start.astimezone(tz).utcoffset()
    )
