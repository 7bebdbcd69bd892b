"""``@app.every`` / ``@app.cron``: when ticks fall, where a new publisher starts, TestApp."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from rabbitflow import App, Message
from rabbitflow._schedule import Cron, Every
from rabbitflow._schedule.scheduler import first_tick
from rabbitflow.errors import ConfigurationError
from rabbitflow.testing import TestApp
from rabbitflow.topology import parse_topology

T0 = datetime(2026, 3, 29, 0, 59, 50, tzinfo=UTC)


def test_every_ticks_on_multiples_of_the_interval_since_the_epoch() -> None:
    every = Every("30s")
    assert every.after(T0) == datetime(2026, 3, 29, 1, 0, 0, tzinfo=UTC)
    assert every.after(datetime(2026, 3, 29, 1, 0, 0, tzinfo=UTC)) == datetime(
        2026, 3, 29, 1, 0, 30, tzinfo=UTC
    )
    assert every.latest(T0) == datetime(2026, 3, 29, 0, 59, 30, tzinfo=UTC)


def test_cron_honours_the_time_zone_across_a_daylight_saving_change() -> None:
    # Paris moves from UTC+1 to UTC+2 on 29 March 2026: 03:00 local is 02:00 UTC the day
    # before and 01:00 UTC from that day on.
    nightly = Cron("0 3 * * *", timezone="Europe/Paris")
    first = nightly.after(datetime(2026, 3, 27, 12, 0, tzinfo=UTC))
    assert first == datetime(2026, 3, 28, 2, 0, tzinfo=UTC)  # CET: UTC+1
    assert nightly.after(first) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # CEST: UTC+2
    local = nightly.after(first).astimezone(ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute) == (3, 0)


def test_cron_latest_includes_a_tick_exactly_now() -> None:
    hourly = Cron("0 * * * *")
    on_the_hour = datetime(2026, 1, 1, 5, 0, tzinfo=UTC)
    assert hourly.latest(on_the_hour) == on_the_hour
    assert hourly.after(on_the_hour) == on_the_hour + timedelta(hours=1)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Cron("0 3 * *"), "five fields"),
        (lambda: Cron("0 25 * * *"), "cron('0 25 * * *'): [0 25 * * *] is not acceptable"),
        (lambda: Cron("0 3 * * *", timezone="Mars/Olympus"), "unknown time zone"),
        (lambda: Every("10ms"), "shortest interval is 1s"),
        (lambda: Every("soon"), "not a duration"),
    ],
)
def test_a_bad_schedule_is_refused_when_the_decorator_runs(build: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        build()  # type: ignore[operator]


def test_a_new_publisher_never_repeats_or_publishes_early() -> None:
    every = App(topology="unused.toml")

    @every.every("1m", exchange="x", routing_key="k", name="s")
    def job() -> None: ...

    schedule = every.schedules["s"]
    now = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    noon = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    # Never published: start at the next tick, not with the one that just passed.
    assert first_tick(schedule, None, now) == noon + timedelta(minutes=1)
    # The noon tick is published already: the next one, at its time.
    assert first_tick(schedule, noon, now) == noon + timedelta(minutes=1)
    # The previous holder died before noon's tick: publish it now (late, never early).
    assert first_tick(schedule, noon - timedelta(minutes=1), now) == noon
    # Down for a day: the missed ticks make one.
    assert first_tick(schedule, noon - timedelta(days=1), now) == noon


def test_two_schedules_of_one_name_are_an_error() -> None:
    app = App(topology="unused.toml")
    app.every("1s", exchange="", routing_key="q", name="same")(lambda: None)
    with pytest.raises(ConfigurationError, match="two schedules are named 'same'"):
        app.cron("* * * * *", exchange="", routing_key="q", name="same")(lambda: None)


def test_the_decorators_return_the_function_unchanged_and_name_it() -> None:
    app = App(topology="unused.toml")

    def nightly() -> dict[str, str]:
        return {}

    assert app.cron("0 3 * * *", exchange="", routing_key="q")(nightly) is nightly
    assert list(app.schedules) == [
        f"{__name__}.test_the_decorators_return_the_function_unchanged_and_name_it.<locals>.nightly"
    ]


TOPOLOGY = """
[exchanges.reports]
type = "direct"

[queues."reports.requested"]
queue_type = "classic"
bindings = [{ exchange = "reports", routing_key = "report.requested" }]
"""


async def test_testapp_runs_a_tick_and_the_consumer_gets_it_with_its_identity() -> None:
    app = App(topology="unused.toml")
    got: list[tuple[dict[str, int], str | None, object]] = []
    skip = {"now": False}

    @app.every("30s", exchange="reports", routing_key="report.requested")
    async def request_report() -> dict[str, int] | None:
        return None if skip["now"] else {"n": 1}

    @app.consumer("reports.requested")
    async def build(payload: dict[str, int], message: Message) -> None:
        got.append((payload, message.message_id, message.headers["rabbitflow-scheduled-at"]))

    at = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    async with TestApp(app, parse_topology(TOPOLOGY)) as t:
        message_id = await t.tick(request_report, at=at)
        skip["now"] = True
        assert await t.tick(request_report, at=at + timedelta(seconds=30)) is None
        await t.drain()

    assert (
        message_id
        == f"{request_report.__module__}.{request_report.__qualname__}@2026-01-01T12:00:30.000Z"
    )
    assert got == [({"n": 1}, message_id, "2026-01-01T12:00:30.000Z")]
