"""When a schedule is due: fixed intervals aligned to the epoch, or cron expressions."""

from __future__ import annotations

import math
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

    Daylight-saving changes follow croniter: a wall-clock time that does not exist that day
    is skipped, one that occurs twice fires once."""

    __slots__ = ("expression", "timezone", "zone")

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
        if len(expression.split()) != 5:
            raise ConfigurationError(
                f"cron({expression!r}): expected five fields (minute hour day month weekday)"
            )
        try:
            croniter(expression, datetime.now(self.zone))
        except (CroniterBadCronError, ValueError, KeyError) as exc:
            raise ConfigurationError(f"cron({expression!r}): {exc}") from None

    def after(self, moment: datetime) -> datetime:
        start = moment.astimezone(self.zone)
        found: datetime = croniter(self.expression, start).get_next(datetime)
        return found.astimezone(UTC)

    def latest(self, moment: datetime) -> datetime:
        # croniter's get_prev is strict; a tick exactly at ``moment`` counts as the latest.
        start = (moment + timedelta(microseconds=1)).astimezone(self.zone)
        found: datetime = croniter(self.expression, start).get_prev(datetime)
        return found.astimezone(UTC)

    def describe(self) -> str:
        return f"cron {self.expression} ({self.timezone})"


def _utc(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def period_s(timing: Timing, moment: datetime) -> float:
    """The gap between the next two ticks after ``moment``, in seconds."""
    first = timing.after(moment)
    return (timing.after(first) - first).total_seconds()
