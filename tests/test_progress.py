"""A worker that says it is working: at INFO, one progress line per consumer with traffic
every interval, a last one at shutdown, and with ``--workers N`` every line names its worker
and pid. Read from the counters the dispatcher keeps for ``/metrics``: no line per message.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs

from rabbitflow._metrics import DURATION_BUCKETS, Metrics
from rabbitflow._outcome import Action
from rabbitflow._progress import Progress, interval_seconds, quantile
from rabbitflow.errors import ConfigurationError
from tests.apps.work import TOPOLOGY
from tests.support.amqp import publish
from tests.support.processes import Workers, run_cli
from tests.support.waiting import wait_until

# -- the figures -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def settle(metrics: Metrics, queue: str, action: Action, seconds: float, times: int = 1) -> None:
    """What the dispatcher does for each delivery."""
    for _ in range(times):
        metrics.duration.histogram(queue).observe(seconds)
        metrics.consumed.labels(queue, action.value).inc()


def test_a_line_per_consumer_with_traffic_and_none_without() -> None:
    metrics, clock = Metrics(), Clock()
    progress = Progress(metrics, ["billing", "shipping"], 60.0, clock=clock)
    # Given 60 s in which billing settled 100 messages and shipping none
    settle(metrics, "billing", Action.ACK, 0.003, times=90)
    settle(metrics, "billing", Action.RETRY, 0.2, times=6)
    settle(metrics, "billing", Action.DEAD_LETTER, 0.004, times=3)
    settle(metrics, "billing", Action.DEFER, 0.001)
    clock.now += 60

    with capture_logs() as logs:
        progress.report()

    # Then one line, for billing: outcomes, rate, percentiles, interval, total
    [line] = logs
    assert line.pop("log_level") == "info"
    assert line == {
        "event": "progress",
        "queue": "billing",
        "handled": 100,
        "acked": 90,
        "retried": 6,
        "dead_lettered": 3,
        "deferred": 1,
        "rate": 1.7,
        # Interpolated inside their buckets as histogram_quantile does: rank 50 is the 49th
        # of 93 in 2.5-5 ms, rank 99 the 5th of 6 in 100-250 ms (the retried ones).
        "p50_ms": 3.82,
        "p99_ms": 225.0,
        "interval_s": 60.0,
        "total": 100,
    }

    # And the next interval counts from there: nothing new, no line
    clock.now += 60
    with capture_logs() as quiet:
        progress.report()
    assert quiet == []


def test_the_last_line_at_shutdown_comes_even_after_a_quiet_interval() -> None:
    metrics, clock = Metrics(), Clock()
    progress = Progress(metrics, ["billing", "idle"], 60.0, clock=clock)
    settle(metrics, "billing", Action.ACK, 0.01, times=5)
    clock.now += 60
    with capture_logs():
        progress.report()
    clock.now += 12.5

    with capture_logs() as logs:
        progress.finish()

    # The consumer that never handled anything says nothing; the other its totals.
    [line] = logs
    assert (line["queue"], line["handled"], line["total"], line["final"]) == ("billing", 0, 5, True)
    assert line["interval_s"] == 12.5
    assert "p50_ms" not in line


def test_quantiles_from_the_histogram() -> None:
    bounds = DURATION_BUCKETS
    counts = [0] * (len(bounds) + 1)
    assert quantile(0.5, bounds, counts) is None
    counts[0] = 10  # ten deliveries under 1 ms
    assert quantile(0.5, bounds, counts) == pytest.approx(0.0005)
    counts[-1] = 990  # and 990 beyond the largest bucket (60 s)
    assert quantile(0.99, bounds, counts) == 60.0


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("60s", 60.0), ("250ms", 0.25), (1500, 1.5), (2.5, 2.5), (None, None), (0, None), ("0", None)],
)
def test_interval_settings(given: str | int | float | None, seconds: float | None) -> None:
    assert interval_seconds(given) == seconds


def test_an_interval_of_bare_milliseconds_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r'30 ms, below 100 ms: write a unit \("30s"'):
        interval_seconds(30)
    with pytest.raises(ConfigurationError, match="is not a duration"):
        interval_seconds("soon")


def test_run_refuses_a_bad_interval_before_starting() -> None:
    result = run_cli("run", "tests.apps.fates:app", "--progress-interval", "soon")
    assert result.returncode == 2
    assert "--progress-interval" in result.stderr
    assert "'soon' is not a duration" in result.stderr


# -- a real worker ---------------------------------------------------------------------------


def fates(ok: int, retry: int, reject: int) -> list[tuple[str, bytes]]:
    plan = ["ok"] * ok + ["retry"] * retry + ["reject"] * reject
    return [(f"m{i}", json.dumps({"fate": fate, "ms": 2}).encode()) for i, fate in enumerate(plan)]


def total(lines: list[dict[str, Any]], field: str) -> int:
    return sum(line.get(field, 0) for line in lines)


@pytest.mark.broker
@pytest.mark.slow
def test_two_workers_report_progress_and_every_line_names_its_worker(
    vhost_url: str, workers: Workers
) -> None:
    # Given `rabbitflow run --workers 2` with a progress line every 500 ms
    supervisor = workers.start(
        "tests.apps.fates:app", TOPOLOGY, "--workers", "2", "--progress-interval", "500ms"
    )
    wait_until(
        lambda: len({e["pid"] for e in supervisor.events() if e["event"] == "consuming"}) == 2,
        15,
        "both workers to consume",
    )

    # When 60 messages are acked, 10 fail twice (a retry, then the DLQ), 10 are rejected
    publish(vhost_url, "jobs", "work", fates(ok=60, retry=10, reject=10))

    def progress() -> list[dict[str, Any]]:
        return [e for e in supervisor.events() if e["event"] == "progress"]

    wait_until(lambda: total(progress(), "handled") == 90, 30, "90 settled deliveries reported")
    code, _ = supervisor.stop(timeout=20)
    assert code == 0, supervisor.output()
    events = supervisor.events()

    # Then the periodic lines, summed over both workers, tell every fate once
    periodic = [e for e in events if e["event"] == "progress" and not e.get("final")]
    assert total(periodic, "acked") == 60
    assert total(periodic, "retried") == 10
    assert total(periodic, "dead_lettered") == 20
    for line in periodic:
        assert line["level"] == "info"
        assert line["queue"] == "work"
        assert line["handled"] > 0
        assert line["rate"] > 0
        assert 0 < line["p50_ms"] <= line["p99_ms"]
        assert 0.4 <= line["interval_s"] < 5

    # And every child's line names its worker and pid, as the supervisor started them
    started = {e["worker"]: e["pid"] for e in events if e["event"] == "worker started"}
    assert sorted(started) == [0, 1]
    children = [e for e in events if e["event"] != "worker started"]
    assert {(e["worker"], e["pid"]) for e in children} == set(started.items())
    assert Counter(e["worker"] for e in children if e["event"] == "stopped") == {0: 1, 1: 1}

    # And each worker that handled messages says so once more at shutdown, before "stopped"
    busy = {e["worker"] for e in periodic}
    for index in busy:
        own = [e["event"] for e in children if e["worker"] == index]
        assert own[-2:] == ["progress", "stopped"], own
        [last] = [e for e in children if e["worker"] == index and e.get("final")]
        assert last["total"] == total([e for e in periodic if e["worker"] == index], "handled")

    # And no line is logged per message at INFO
    assert not [e for e in events if e["level"] == "info" and "message_id" in e]
