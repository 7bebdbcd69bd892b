"""Idempotent consumers under ``rabbitflow run`` on the real RabbitMQ and Redis.

A worker killed with SIGKILL mid-handler: its claim expires with the lease, the redelivered
message runs once on the next worker (not in parallel with the dead one's lease); then a
duplicate publish and a DLQ replay of the same ``message_id`` are acked without running.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.amqp import publish
from tests.support.broker import Rabbit, wait_queues_empty
from tests.support.processes import ROOT, WorkerProcess, Workers, run_cli
from tests.support.services import REDIS_URL, delete_prefix, require_redis
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

LEASE_S = 3.0
APP = """
import asyncio, os, time
from rabbitflow import App, Message
from rabbitflow.idempotency import RedisStore
from tests.apps.recording import record

store = RedisStore(os.environ["RF_REDIS"], prefix=os.environ["RF_PREFIX"], ttl="1h",
                   lease=os.environ["RF_LEASE"])
app = App(idempotency=store, name="idem-test")


@app.consumer("billing", idempotent=True)
async def bill(message: Message) -> None:
    record("start", message.message_id, os.getpid(), time.time())
    await asyncio.sleep(float(os.environ["RF_SLEEP"]))
    record("done", message.message_id, os.getpid(), time.time())
"""
TOPOLOGY = """
[exchanges.orders]
type = "direct"

[queues.billing]
queue_type = "classic"
bindings = [{ exchange = "orders", routing_key = "order.created" }]
retry = { delays = ["1s"], max_attempts = 10 }
prefetch = 5
"""


@pytest.fixture
def prefix() -> Iterator[str]:
    require_redis()
    name = f"rf-test:{uuid.uuid4().hex[:10]}:"
    yield name
    asyncio.run(delete_prefix(REDIS_URL, name))


def worker(workers: Workers, prefix: str, sleep: float, *extra: str) -> WorkerProcess:
    """``billapp:app`` (written into ``tmp_path``) on the store's ``prefix``."""
    store = {"RF_REDIS": REDIS_URL, "RF_PREFIX": prefix, "RF_LEASE": f"{int(LEASE_S * 1000)}ms"}
    path = os.pathsep.join([str(workers.tmp_path), str(ROOT)])
    topology = workers.tmp_path / "topology.toml"
    return workers.start(
        "billapp:app", topology, *extra, sleep=sleep, ready_timeout=30,
        env={"PYTHONPATH": path, **store},
    )  # fmt: skip


@pytest.mark.crash
def test_a_killed_worker_blocks_the_key_only_until_its_lease_ends_then_duplicates_are_skipped(
    tmp_path: Path, rabbit: Rabbit, vhost: str, vhost_url: str, prefix: str, workers: Workers
) -> None:
    (tmp_path / "billapp.py").write_text(APP)
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    records = workers.records
    body = [("order-1", b'{"order_id": 1}')]

    # Given a worker that dies with SIGKILL in the middle of the handler
    first = worker(workers, prefix, sleep=60)
    try:
        publish(vhost_url, "orders", "order.created", body)
        [(_, first_pid, started)] = records.wait_for("start", 1, timeout=15)
        first.kill()
    finally:
        first.kill()

    # When another worker gets the redelivered message
    second = worker(workers, prefix, 0, "--log-level", "debug")
    try:
        [(_, second_pid, finished)] = records.wait_for("done", 1, timeout=30)

        # Then it ran once more, on the second worker, only after the dead claim's lease
        runs = records.of("start")
        assert [pid for _, pid, _ in runs] == [first_pid, second_pid]
        assert float(runs[1][2]) - float(started) >= LEASE_S * 0.9
        # it waited in a tier, not in a loop, and the wait spent no attempt
        assert second.has_event("deferred: not before its time")
        assert not second.has_event("retry scheduled")

        # And a duplicate publish of the same message id is acked without running
        publish(vhost_url, "orders", "order.created", body)
        wait_until(
            lambda: second.output().count("duplicate skipped") >= 1, 15, "the duplicate skip"
        )

        # And so is a copy replayed from the DLQ
        publish(vhost_url, "", "billing.dlq", body)
        replay = run_cli("dlq", "replay", "billing", "--url", vhost_url)
        assert replay.returncode == 0, replay.stderr
        wait_until(lambda: second.output().count("duplicate skipped") >= 2, 15, "the replay skip")
        wait_queues_empty(rabbit, vhost)
        assert len(records.of("start")) == 2
        assert len(records.of("done")) == 1
        assert float(finished) > float(started)
    finally:
        second.kill()
