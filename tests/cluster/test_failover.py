"""Faults of a 3-node cluster while a worker consumes a quorum queue with all three URLs.

Each test feeds uniquely numbered persistent messages with confirms, injects one fault, drains
and checks with the reliability suite's lost/duplicate checker: nothing confirmed is lost,
duplicates stay within the prefetch (the deliveries in hand when the fault struck). The
measured failover times are printed as ``CLUSTER`` lines (``pytest -s``) and appended, as
JSON, to ``$RF_RELIABILITY_REPORT`` when it names a file.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest

from tests.cluster.conftest import Cluster, checker_on
from tests.reliability.checker import QUEUE, REPORT_ENV, Checker, job
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PREFETCH = 10
# Consuming must resume through another node within this many seconds of a node's death.
FAILOVER_LIMIT = 5.0


def _at(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def _events(worker: WorkerProcess, name: str) -> list[dict[str, object]]:
    return [event for event in worker.events() if event.get("event") == name]


def _node_of(event: dict[str, object]) -> int:
    found = urlsplit(str(event["url"])).port
    assert found is not None, event
    return found - 5680


def _resumed_after(checker: Checker, moment: float) -> float:
    """When the first handler run after ``moment`` started."""
    runs = wait_until(
        lambda: [run.at for run in checker.records.runs("start") if run.at > moment],
        30,
        "a handler run after the fault",
    )
    return min(runs)


def _longest_pause(checker: Checker, start: float, seconds: float = 10.0) -> float:
    """The longest time without a handler run starting, from ``start`` for ``seconds``."""
    runs = sorted(run.at for run in checker.records.runs("start") if start <= run.at)
    moments = [start, *[at for at in runs if at <= start + seconds]]
    return max(later - earlier for earlier, later in itertools.pairwise(moments))


def _record(fault: str, **figures: object) -> None:
    line = " ".join(f"{key}={value}" for key, value in figures.items())
    print(f"CLUSTER {fault}: {line}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with Path(path).open("a", encoding="utf-8") as out:
            out.write(json.dumps({"fault": fault, **figures}) + "\n")


def _start(checker: Checker, cluster: Cluster, vhost: str, order: tuple[int, ...]) -> WorkerProcess:
    worker = checker.start_worker(
        "--url-order", "given", "--reconnect-max-wait", "2", url=cluster.urls(vhost, order)
    )
    [connected] = _events(worker, "connected")
    assert _node_of(connected) == order[0], connected
    assert str(connected["broker_version"]).startswith("3.10"), connected
    return worker


def test_the_workers_node_dies_and_it_consumes_through_another(
    cluster: Cluster, cluster_vhost: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given the work queue led by node 1 and a worker connected to node 2 (then 3, then 1)
    with checker_on(cluster, 1, cluster_vhost, tmp_path, request.node.name) as checker:
        checker.write_topology(queue_type="quorum", prefetch=PREFETCH)
        checker.declare()
        worker = _start(checker, cluster, cluster_vhost, (2, 3, 1))
        checker.feed(600, rate=100)
        checker.records.wait_for("done", 100, timeout=20)

        # When node 2 is killed while the worker consumes
        killed_at = cluster.kill(2)

        # Then the worker consumes again through node 3 within 5 s, losing nothing
        worker.wait_for_event("reconnected", timeout=FAILOVER_LIMIT + 5)
        [reconnected] = _events(worker, "reconnected")
        checker.records.wait_for("done", 400, timeout=20)
        pause = _longest_pause(checker, killed_at)
        _record(
            "kill the worker's node",
            reconnected_s=round(_at(reconnected) - killed_at, 2),
            longest_pause_s=round(pause, 2),
            node=_node_of(reconnected),
        )
        assert _node_of(reconnected) == 3
        assert _at(reconnected) - killed_at < FAILOVER_LIMIT
        assert pause < FAILOVER_LIMIT
        checker.drain(timeout=60, restart=False)
        report = checker.report("cluster: kill the worker's node", 1, duplicate_bound=PREFETCH)
        report.check()
        assert report.confirmed == 600


def test_the_work_queues_leader_dies(
    cluster: Cluster, cluster_vhost: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given the work queue led by node 1, a worker on node 2, messages published through node 3
    with checker_on(cluster, 3, cluster_vhost, tmp_path, request.node.name) as checker:
        checker.write_topology(queue_type="quorum", prefetch=PREFETCH)
        checker.declare(url=cluster.url(1, cluster_vhost))
        assert cluster.leader(cluster_vhost, QUEUE) == 1
        worker = _start(checker, cluster, cluster_vhost, (2, 3, 1))
        checker.feed(600, rate=100)
        checker.records.wait_for("done", 100, timeout=20)

        # When the leader's node is killed
        killed_at = cluster.kill(1)

        # Then another node leads, consuming goes on within 5 s, and nothing is lost
        resumed = _resumed_after(checker, killed_at)
        checker.records.wait_for("done", 400, timeout=20)
        pause = _longest_pause(checker, killed_at)
        new_leader = cluster.leader(cluster_vhost, QUEUE)
        _record(
            "kill the work queue's leader",
            first_run_after_kill_s=round(resumed - killed_at, 2),
            longest_pause_s=round(pause, 2),
            reconnections=len(_events(worker, "reconnected")),
            new_leader=new_leader,
        )
        assert new_leader in (2, 3)
        assert pause < FAILOVER_LIMIT
        checker.drain(timeout=60, restart=False)
        report = checker.report("cluster: kill the work queue's leader", 1, PREFETCH)
        report.check()


def test_every_node_dies_and_the_worker_resumes_when_they_return(
    cluster: Cluster, cluster_vhost: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given a worker with all three URLs, consuming
    with checker_on(cluster, 1, cluster_vhost, tmp_path, request.node.name) as checker:
        checker.write_topology(queue_type="quorum", prefetch=PREFETCH)
        checker.declare()
        worker = _start(checker, cluster, cluster_vhost, (1, 2, 3))
        checker.feed(200, rate=100)
        checker.records.wait_for("done", 50, timeout=20)

        # When all three nodes are killed, and started again a second later
        for node in (3, 2, 1):
            cluster.kill(node)
        all_down_at = time.time()
        time.sleep(1)
        assert not worker.has_event("reconnected")
        revived_at = time.time()
        running = cluster.revive(1, 2, 3)

        # Then the worker reconnects by itself (backoff capped at 2 s) and loses nothing
        worker.wait_for_event("reconnected", timeout=30)
        [reconnected] = _events(worker, "reconnected")
        _record(
            "kill all three nodes, then start them",
            outage_s=round(_at(reconnected) - all_down_at, 2),
            reconnected_after_revive_began_s=round(_at(reconnected) - revived_at, 2),
            revive_took_s=round(max(running) - revived_at, 2),
            node=_node_of(reconnected),
        )
        assert worker.process is not None
        assert worker.process.poll() is None
        checker.drain(timeout=90, restart=False)
        report = checker.report("cluster: kill all three, start them", 1, PREFETCH)
        report.check()
        assert report.processed >= 50


def test_a_retry_tiers_leader_dies_with_messages_inside(
    cluster: Cluster, cluster_vhost: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given a 4 s retry tier led by node 1 and a worker on node 2 whose handler always fails
    delay = 4.0
    with checker_on(cluster, 3, cluster_vhost, tmp_path, request.node.name) as checker:
        checker.write_topology(
            queue_type="quorum", prefetch=PREFETCH, retry='{ delays = ["4s"], max_attempts = 2 }'
        )
        checker.declare(url=cluster.url(1, cluster_vhost))
        [tier] = checker.retry_queues()
        assert cluster.leader(cluster_vhost, tier) == 1
        _start(checker, cluster, cluster_vhost, (2, 3, 1))
        checker.publish(
            [
                aio_pika.Message(
                    job(n, action="fail"),
                    message_id=str(n),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                for n in range(50)
            ]
        )
        checker.records.wait_for("start", 50, timeout=20)

        # When the tier's leader is killed while the 50 messages wait in it
        time.sleep(1)
        cluster.kill(1)

        # Then every message comes back for its second attempt on time, and reaches the DLQ
        checker.records.wait_for("start", 100, timeout=delay + 20)
        first: dict[str, float] = {}
        late: list[float] = []
        for run in checker.records.runs("start"):
            if run.attempt == 1:
                first[run.key] = run.at
            else:
                late.append(run.at - first[run.key] - delay)
        _record(
            "kill a retry tier's leader with 50 messages waiting",
            new_leader=cluster.leader(cluster_vhost, tier),
            earliest_s=round(min(late), 2),
            latest_s=round(max(late), 2),
        )
        assert len(late) == 50
        assert min(late) > -0.1
        assert max(late) < FAILOVER_LIMIT
        checker.drain(timeout=60, restart=False)
        report = checker.report("cluster: kill a retry tier's leader", 1, PREFETCH)
        report.check()
        assert report.dead_lettered == 50
