"""When a schedule is due: fixed intervals aligned to the epoch, or cron expressions."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, croniter  # type: ignore[import-untyped]

from rabbitflow._duration import format_duration, parse_duration
from rabbitflow.errors import ConfigurationError


class Timing(Protocol):
    """The tick times of a schedule, as aware UTC datetimes."""

    def after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment``."""
        ...

    def latest(self, moment: datetime) -> datetime:
        """The last tick at or before ``moment``."""
        ...

    def describe(self) -> str:
        """``every 30s`` or ``cron 0 3 * * * (Europe/Paris)``."""
        ...


class Every:
    """Every ``interval``, at multiples of it since the Unix epoch (``"30s"``: :00 and :30).

    Aligning to the epoch gives every process the same tick times, so a tick has one
    identity wherever it is computed."""

    __slots__ = ("interval_ms",)

    def __init__(self, interval: str | int) -> None:
        try:
            self.interval_ms = parse_duration(interval)
        except ValueError as exc:
            raise ConfigurationError(f"every({interval!r}): {exc}") from None
        if self.interval_ms < 1000:
            raise ConfigurationError(f"every({interval!r}): the shortest interval is 1s")

    def after(self, moment: datetime) -> datetime:
        ms = moment.timestamp() * 1000
        return _utc((math.floor(ms / self.interval_ms) + 1) * self.interval_ms)

    def latest(self, moment: datetime) -> datetime:
        ms = moment.timestamp() * 1000
        return _utc(math.floor(ms / self.interval_ms) * self.interval_ms)

    def describe(self) -> str:
        return f"every {format_duration(self.interval_ms)}"


class Cron:
    """A five-field cron expression evaluated in ``timezone`` (an IANA name; default UTC).

    Daylight-saving changes follow Vixie cron (and cronie, the cron of most Linux systems),
    which tells two kinds of expression apart by their minute and hour fields:

    - **Fixed-time** (neither field starts with ``*``: ``0 1 * * *``, ``30 2 * * 1-5``): each
      matching wall-clock time fires once a day. A time the clocks skip (02:30 on the night
      they go forward) fires at the end of the jump (03:00), once even if several times of
      the expression fall in the skipped hour; a time they repeat (01:00 on the night they go
      back) fires at its first occurrence only.
    - **Wildcard** (``*/30 * * * *``, ``0 * * * *``, ``*/5 9 * * *``): fires at every real
      instant whose wall-clock time matches. Nothing fires in the skipped hour, which never
      happens, and the repeated hour fires twice, being two real hours: every instant once.

    Ticks are instants (aware UTC datetimes), so a tick's identity (its ``message_id``) is
    the same in every process and never names two ticks."""

    __slots__ = ("_fixed", "expression", "timezone", "zone")

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        self.expression = expression
        self.timezone = timezone
        try:
            self.zone: tzinfo = UTC if timezone == "UTC" else ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"cron({expression!r}): unknown time zone {timezone!r} "
                "(use an IANA name such as 'Europe/Paris')"
            ) from None
        fields = expression.split()
        if len(fields) != 5:
            raise ConfigurationError(
                f"cron({expression!r}): expected five fields (minute hour day month weekday)"
            )
        try:
            croniter(expression, datetime(2000, 1, 1))
        except (CroniterBadCronError, ValueError, KeyError) as exc:
            raise ConfigurationError(f"cron({expression!r}): {exc}") from None
        # Vixie cron's MIN_STAR / HR_STAR flags: a field written with a leading "*".
        self._fixed = not (fields[0].startswith("*") or fields[1].startswith("*"))

    def after(self, moment: datetime) -> datetime:
        return next(self._ticks(moment))

    def latest(self, moment: datetime) -> datetime:
        # Walk forward from shortly before the latest matching wall-clock time: a DST change
        # moves an instant by at most a few hours from where the current offset puts it.
        offset = _offset(self.zone, moment)
        wall = _wall(moment, offset)
        previous: datetime = croniter(self.expression, wall + _TINY).get_prev(datetime)
        margin = _LATEST_MARGIN
        while True:
            start = min(_instant(previous, offset), moment) - margin
            found = None
            for tick in self._ticks(start):
                if tick > moment:
                    break
                found = tick
            if found is not None:
                return found
            margin *= 8  # only a zone whose clocks jumped by more than a day gets here

    def describe(self) -> str:
        return f"cron {self.expression} ({self.timezone})"

    def _ticks(self, moment: datetime) -> Iterator[datetime]:
        """Every tick strictly after ``moment``, in order.

        Between two changes of the zone's UTC offset a wall-clock time is one instant, so the
        walk goes from change to change, and applies the rule above at each."""
        start = moment
        local = moment.astimezone(self.zone)
        if self._fixed and local.fold:
            # In the second pass of a repeated hour: start from the first, which knows that
            # the fixed times of the hour already fired.
            start = local.replace(fold=0).astimezone(UTC)
        at = start
        offset = _offset(self.zone, at)
        walls = self._walls(_wall(at, offset), strict=True)
        while True:
            wall = next(walls)
            candidate = _instant(wall, offset)
            change = _next_change(self.zone, at, candidate)
            if change is None:
                if candidate > moment:
                    yield candidate
                at = candidate
                continue
            new = _offset(self.zone, change)
            if new > offset:
                # Clocks go forward: wall-clock times [change+offset, change+new) never happen.
                gap_end = _wall(change, new)
                if self._fixed and wall < gap_end:
                    if change > moment:
                        yield change
                    walls = self._walls(gap_end, strict=True)  # gap_end is this same instant
                else:
                    walls = self._walls(gap_end, strict=False)
            elif self._fixed:
                # Clocks go back: [change+new, change+offset) comes again; its fixed times
                # fired the first time.
                walls = self._walls(_wall(change, offset), strict=False)
            else:
                walls = self._walls(_wall(change, new), strict=False)
            at, offset = change, new

    def _walls(self, floor: datetime, *, strict: bool) -> Iterator[datetime]:
        """The naive wall-clock times of the expression after ``floor`` (from it, unless
        strict), in order."""
        walls = croniter(self.expression, floor if strict else floor - _TINY)
        while True:
            found: datetime = walls.get_next(datetime)
            yield found


_TINY = timedelta(microseconds=1)
_LATEST_MARGIN = timedelta(hours=3)
# No zone changes its offset twice within six hours: one probe per step finds every change.
_PROBE_STEP = timedelta(hours=6)


def _offset(zone: tzinfo, at: datetime) -> timedelta:
    offset = at.astimezone(zone).utcoffset()
    return offset if offset is not None else timedelta(0)


def _wall(at: datetime, offset: timedelta) -> datetime:
    """The naive wall-clock time of the instant ``at`` in a zone at ``offset``."""
    return (at.astimezone(UTC) + offset).replace(tzinfo=None)


def _instant(wall: datetime, offset: timedelta) -> datetime:
    """The instant a naive wall-clock time stands for at ``offset``."""
    return (wall - offset).replace(tzinfo=UTC)


def _next_change(zone: tzinfo, start: datetime, end: datetime) -> datetime | None:
    """The first instant in (start, end] at which ``zone``'s UTC offset differs from the one
    at ``start``; None when it does not change."""
    base = _offset(zone, start)
    low = start
    while low < end:
        high = min(low + _PROBE_STEP, end)
        if _offset(zone, high) != base:
            return _bisect_change(zone, low, high, base)
        low = high
    return None


def _bisect_change(zone: tzinfo, low: datetime, high: datetime, base: timedelta) -> datetime:
    # Offsets change on whole seconds: bisect over seconds, ``lo`` at ``base``, ``hi`` past it.
    lo = math.floor(low.timestamp())
    hi = math.ceil(high.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(zone, datetime.fromtimestamp(mid, UTC)) == base:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def _utc(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def period_s(timing: Timing, moment: datetime) -> float:
    """The gap between the next two ticks after ``moment``, in seconds."""
    first = timing.after(moment)
    return (timing.after(first) - first).total_seconds()
