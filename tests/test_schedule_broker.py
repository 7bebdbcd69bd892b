"""Scheduled publishing on a real broker: three ``rabbitflow run`` processes, one publisher.

The leader is killed with SIGKILL half-way between two ticks; another process must take the
lease and publish the next tick on time, and no tick may be published twice or early.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter
from datetime import datetime

import pytest

from tests.support.processes import ROOT, Workers
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.crash]

TICKER = "tests.apps.ticker:app"
TOPOLOGY = ROOT / "tests" / "apps" / "work.toml"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_three_processes_publish_each_tick_once_and_survive_kill_9_of_the_leader(
    workers: Workers,
) -> None:
    # Given three processes serving an app with an every("1s") schedule
    processes = [workers.start(TICKER, TOPOLOGY) for _ in range(3)]
    records = workers.records
    produced = records.wait_for("produced", 3, timeout=15)
    leader = int(produced[-1][0])
    assert leader in {p.pid for p in processes}

    # When the process publishing the ticks is killed half-way between two ticks
    wait_until(lambda: 0.4 < time.time() % 1 < 0.6, 2, "the middle of a second", 0.01)
    before = len(records.of("produced"))
    os.kill(leader, signal.SIGKILL)
    killed_at = time.time()
    after = records.wait_for("produced", before + 4, timeout=15)[before:]

    # Then another process publishes from the next tick on
    successors = {int(pid) for pid, _ in after}
    assert leader not in successors
    assert len(successors) == 1
    first_after = float(after[0][1])
    print(f"takeover: first tick of the new leader {first_after - killed_at:.3f}s after kill -9")
    assert first_after - killed_at < 1.0, "takeover took longer than one interval"

    for process in processes:
        if process.pid != leader:
            process.stop()
    # Every tick reached the consumers once (a redelivery of a tick the killed process had in
    # hand is not a second publish), consecutive, none early.
    ticks = [fields for fields in records.of("tick") if fields[3] == "0"]
    counts = Counter(fields[0] for fields in ticks)
    assert max(counts.values()) == 1, counts.most_common(3)
    scheduled = sorted(_epoch(fields[1]) for fields in ticks)
    assert len(scheduled) >= 7
    gaps = {round(b - a, 3) for a, b in itertools.pairwise(scheduled)}
    assert gaps == {1.0}, f"a tick is missing: {gaps}"
    assert all(float(fields[2]) >= _epoch(fields[1]) for fields in ticks)
