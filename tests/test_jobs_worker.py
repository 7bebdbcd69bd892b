"""Jobs under ``rabbitflow run`` in a subprocess, on the real broker, Redis and PostgreSQL:
a job failing every attempt, replayed from its DLQ with ``rabbitflow dlq replay --jobs``; a
worker killed with SIGKILL mid-job; a job store (a private ``redis-server``) killed under
a stream of jobs.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rabbitflow import App
from rabbitflow.idempotency import PostgresStore, RedisStore
from rabbitflow.jobs import JobState, JobStatus
from tests.reliability.stores import PrivateRedis
from tests.support.amqp import message_counts
from tests.support.processes import ROOT, WorkerProcess, run_cli
from tests.support.records import Records
from tests.support.services import (
    POSTGRES_URL,
    REDIS_URL,
    delete_prefix,
    drop_table,
    require_postgres,
    require_redis,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

APP = """
import asyncio, os
from pathlib import Path
from rabbitflow import App, Message
from rabbitflow.idempotency import PostgresStore, RedisStore
from tests.apps.recording import record

url, space = os.environ["RF_JOBS"], os.environ["RF_SPACE"]
if url.startswith("redis"):
    store = RedisStore(url, prefix=space, timeout="500ms")
else:
    store = PostgresStore(url, table=space, timeout="500ms")
app = App(jobs=store, name="jobs-test")


@app.consumer("sales", track=True)
async def build(req: dict, message: Message) -> dict:
    record("start", message.message_id, message.attempt, os.getpid())
    if Path(os.environ["RF_FAIL"]).exists():
        raise RuntimeError("told to fail")
    await asyncio.sleep(float(Path(os.environ["RF_SLEEP"]).read_text() or "0"))
    record("done", message.message_id, message.attempt, os.getpid())
    return {"n": req["n"], "pid": os.getpid()}
"""
TOPOLOGY = """
[exchanges.reports]
type = "direct"

[queues.sales]
queue_type = "classic"
bindings = [{ exchange = "reports", routing_key = "report.sales" }]
retry = { delays = ["100ms"], max_attempts = 3 }
prefetch = 10
"""


class Jobs:
    """The test's side: a store of the test's own, an app to enqueue with, statuses."""

    def __init__(self, url: str, space: str, broker: str, topology: Path) -> None:
        self.url, self.space, self.broker, self.topology = url, space, broker, topology

    def _store(self) -> Any:
        if self.url.startswith("redis"):
            return RedisStore(self.url, prefix=self.space)
        return PostgresStore(self.url, table=self.space)

    async def _with_app(self, work: Any) -> Any:
        store = self._store()
        app = App(self.topology, url=self.broker, jobs=store)
        try:
            async with app:
                return await work(app)
        finally:
            await store.close()

    def enqueue(self, count: int = 1) -> list[str]:
        async def work(app: App) -> list[str]:
            jobs = [await app.enqueue("reports", "report.sales", {"n": n}) for n in range(count)]
            return [job.id for job in jobs]

        return asyncio.run(self._with_app(work))  # type: ignore[no-any-return]

    def statuses(self, ids: list[str]) -> list[JobStatus | None]:
        async def work(app: App) -> list[JobStatus | None]:
            return [await app.jobs.get(job_id) for job_id in ids]

        return asyncio.run(self._with_app(work))  # type: ignore[no-any-return]

    def status(self, job_id: str) -> JobStatus | None:
        return self.statuses([job_id])[0]

    def state(self, job_id: str) -> JobState | None:
        found = self.status(job_id)
        return None if found is None else found.state

    def result(self, job_id: str, timeout: float) -> Any:
        async def work(app: App) -> Any:
            return await app.job(job_id).result(timeout=timeout)

        return asyncio.run(self._with_app(work))


@pytest.fixture(params=["redis", "postgres"])
def space(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    name = uuid.uuid4().hex[:10]
    if request.param == "redis":
        require_redis()
        prefix = f"rf-test:{name}:"
        yield REDIS_URL, prefix
        asyncio.run(delete_prefix(REDIS_URL, prefix))
    else:
        require_postgres()
        table = f"rf_{name}"
        yield POSTGRES_URL, table
        asyncio.run(drop_table(POSTGRES_URL, f"{table}_jobs"))
        asyncio.run(drop_table(POSTGRES_URL, table))


class Setup:
    def __init__(self, tmp_path: Path, url: str, store_url: str, space: str) -> None:
        (tmp_path / "jobsapp.py").write_text(APP)
        self.topology = tmp_path / "topology.toml"
        self.topology.write_text(TOPOLOGY)
        self.fail = tmp_path / "fail"
        self.sleep = tmp_path / "sleep"
        self.sleep.write_text("0")
        self.tmp_path, self.url, self.store_url, self.space = tmp_path, url, store_url, space
        self.records = Records(tmp_path / "records.txt")
        self.jobs = Jobs(store_url, space, url, self.topology)

    def worker(self) -> WorkerProcess:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self.tmp_path), str(ROOT)]),
            "PYTHONUNBUFFERED": "1",
            "RF_RECORD": str(self.tmp_path / "records.txt"),
            "RF_JOBS": self.store_url,
            "RF_SPACE": self.space,
            "RF_FAIL": str(self.fail),
            "RF_SLEEP": str(self.sleep),
        }
        env.pop("RABBITFLOW_URL", None)
        process = WorkerProcess(
            "jobsapp:app", self.url, self.topology, self.tmp_path / "worker.log", env
        ).start()
        process.wait_for_event("consuming", timeout=30)
        return process


def test_a_job_failing_every_attempt_is_failed_in_the_dlq_and_a_replay_queues_it_again(
    tmp_path: Path, vhost_url: str, space: tuple[str, str]
) -> None:
    setup = Setup(tmp_path, vhost_url, *space)
    setup.fail.touch()
    worker = setup.worker()
    try:
        # Given a job whose handler fails on every attempt
        [job_id] = setup.jobs.enqueue()
        wait_until(lambda: setup.jobs.state(job_id) is JobState.FAILED, 30, "the job failed")
        status = setup.jobs.status(job_id)
        assert status is not None
        assert status.attempt == 3
        assert status.error == "RuntimeError: told to fail"
        assert status.error_type == "RuntimeError"
        assert message_counts(vhost_url, ["sales.dlq"]) == {"sales.dlq": 1}
    finally:
        worker.stop()

    # When the cause is gone and its dead letter is replayed, naming the job store
    setup.fail.unlink()
    store_url, prefix = space
    replayed = run_cli(
        "dlq",
        "replay",
        "sales",
        "--url",
        vhost_url,
        "--jobs",
        store_url,
        "--jobs-prefix",
        f"{prefix}jobs:" if store_url.startswith("redis") else f"{prefix}_jobs",
    )
    assert replayed.returncode == 0, replayed.stderr

    # Then the job is queued again, and succeeds once a worker runs it
    assert setup.jobs.state(job_id) is JobState.QUEUED
    worker = setup.worker()
    try:
        assert setup.jobs.result(job_id, timeout=30)["n"] == 0
        status = setup.jobs.status(job_id)
        assert status is not None
        assert status.state is JobState.SUCCEEDED
    finally:
        worker.stop()


@pytest.mark.crash
def test_a_job_whose_worker_is_killed_mid_job_succeeds_after_redelivery(
    tmp_path: Path, vhost_url: str, space: tuple[str, str]
) -> None:
    setup = Setup(tmp_path, vhost_url, *space)
    setup.sleep.write_text("60")
    first = setup.worker()
    try:
        # Given a job running on a worker that dies with SIGKILL
        [job_id] = setup.jobs.enqueue()
        setup.records.wait_for("start", 1, timeout=15)
        wait_until(lambda: setup.jobs.state(job_id) is JobState.RUNNING, 10, "running")
        first.kill()
    finally:
        first.kill()
    assert setup.jobs.state(job_id) is JobState.RUNNING  # nothing else could say otherwise

    # When another worker gets the redelivered message
    setup.sleep.write_text("0")
    second = setup.worker()
    try:
        # Then the job ends succeeded, on the second worker, not stuck running
        result = setup.jobs.result(job_id, timeout=30)
        assert result["pid"] == second.pid
        status = setup.jobs.status(job_id)
        assert status is not None
        assert status.state is JobState.SUCCEEDED
        assert status.attempt == 1  # a classic queue's redelivery is the same attempt
    finally:
        second.stop()


class JobsRedis(PrivateRedis):
    """A private ``redis-server`` on a port of this test's range (5720-5729)."""

    def __init__(self, log: Path) -> None:
        PrivateRedis.__init__(self, log, range(5720, 5730))


@pytest.mark.chaos
def test_a_job_store_outage_delays_statuses_and_costs_no_message_an_attempt(
    tmp_path: Path, vhost_url: str
) -> None:
    redis = JobsRedis(tmp_path / "redis.log")
    redis.start()
    try:
        setup = Setup(tmp_path, vhost_url, redis.url, "rf-outage:")
        worker = setup.worker()
        try:
            # Given jobs handled while the job store answers
            before = setup.jobs.enqueue(20)
            wait_until(
                lambda: all(
                    s is not None and s.state is JobState.SUCCEEDED
                    for s in setup.jobs.statuses(before)
                ),
                20,
                "the first jobs succeeded",
            )
            # When the store is killed, and more jobs are published meanwhile
            redis.kill()
            during = setup.jobs.enqueue(20)  # the store is down: sent, not recorded queued
            # Then every message is handled, each on its first attempt
            done = setup.records.wait_for("done", 40, timeout=30)
            assert sorted(row[0] for row in done if row[0] in during) == sorted(during)
            assert {row[1] for row in setup.records.of("start")} == {"1"}
            # And once the store answers again, the statuses written late catch up
            redis.start()
            wait_until(
                lambda: all(
                    s is not None and s.state is JobState.SUCCEEDED
                    for s in setup.jobs.statuses(during)
                ),
                30,
                "the statuses written once the store is back",
            )
            assert message_counts(vhost_url, ["sales", "sales.dlq"]) == {
                "sales": 0,
                "sales.dlq": 0,
            }
            assert worker.has_event("job store unavailable: status updates wait until it answers")
        finally:
            worker.stop()
    finally:
        redis.close()
