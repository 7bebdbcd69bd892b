"""The monitor's account of messages held by the broker's dead-lettering, on a clock the test
moves and a management API that answers what the test says (no broker needed)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from rabbitflow._metrics import Metrics
from rabbitflow._retries import TierMonitor
from rabbitflow.topology import derive, parse_topology


async def test_the_warning_waits_one_interval_repeats_with_the_age_and_ends_with_an_info(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a monitor of a quorum queue with a 10 s tier, on a clock the test moves, whose
    # management API reports 2 messages held in the work queue for three samples, then none
    declarations = derive(
        parse_topology('[queues.q]\nqueue_type = "quorum"\nretry = { delays = ["10s"] }\n')
    )
    clock = [1000.0]
    monkeypatch.setattr("rabbitflow._retries.time.monotonic", lambda: clock[0])
    held = iter([2, 2, 2, 0])

    async def depths() -> dict[str, dict[str, int]]:
        row = {"messages": 0, "messages_ready": 0, "messages_dlx": 0}
        return {
            "q": {**row, "messages_dlx": next(held)},
            "q.retry.10s": row,
            "q.dlq": row,
        }

    metrics = Metrics()
    monitor = TierMonitor([declarations.routes["q"]], metrics, interval=30, depths=depths)

    # When it samples every 30 s
    with capture_logs() as logs:
        for _ in range(4):
            await monitor.sample(None)  # type: ignore[arg-type]  # every depth is in the API's
            clock[0] += 30

    # Then no warning on the first sight (dead-lettering takes milliseconds), one per sample
    # after it with the age, and an INFO when they are gone; the gauge follows
    said = [(line["log_level"], line.get("for_s")) for line in logs]
    assert said == [("warning", 30), ("warning", 60), ("info", 90)]
    assert 'rabbitflow_broker_held_messages{queue="q"} 0' in metrics.render()
