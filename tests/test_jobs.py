"""Jobs (contract section 12) on the real broker, against each store: Redis, PostgreSQL and
memory. A worker on the test's event loop; the job's states read back through ``app.jobs``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from rabbitflow import App, ConfigurationError, Message, Reject
from rabbitflow.idempotency import PostgresStore, RedisStore
from rabbitflow.jobs import JobCancelled, JobFailed, JobState, JobTimeout
from tests.support.services import (
    POSTGRES_URL,
    REDIS_URL,
    delete_prefix,
    drop_table,
    require_postgres,
    require_redis,
)
from tests.support.stores import dispose, make_store
from tests.support.worker import running

pytestmark = [pytest.mark.broker]

TOPOLOGY = """
[exchanges.reports]
type = "direct"

[queues.sales]
queue_type = "classic"
bindings = [{ exchange = "reports", routing_key = "report.sales" }]
retry = { delays = ["200ms"], max_attempts = 3 }
prefetch = 20
track = true
"""


class ReportRequest(BaseModel):
    month: str
    fail: bool = False
    slow: float = 0.0


class Report(BaseModel):
    month: str
    total: int


@pytest.fixture(params=["redis", "postgres", "memory"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    made, token = await make_store(request.param)
    try:
        yield made
    finally:
        await dispose(request.param, made, token)


def make_app(tmp_path: Path, store: Any, url: str) -> tuple[App, dict[str, Any]]:
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    app = App(tmp_path / "topology.toml", url=url, jobs=store, jobs_ttl="1h")
    seen: dict[str, Any] = {"gate": asyncio.Event(), "runs": 0}

    @app.consumer("sales")
    async def build(req: ReportRequest, message: Message) -> Report:
        seen["runs"] += 1
        if req.fail:
            raise KeyError(req.month)
        if req.slow:
            await message.progress(0.5, "half way")
            for _ in range(int(req.slow * 20)):
                if message.cancelled:
                    return Report(month=req.month, total=-1)
                await asyncio.sleep(0.05)
        return Report(month=req.month, total=42)

    return app, seen


async def test_an_enqueued_job_runs_and_its_result_is_waited_for(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    app, _ = make_app(tmp_path, store, vhost_url)
    async with running(app, vhost_url), app:
        # Given a job enqueued
        job = await app.enqueue("reports", "report.sales", ReportRequest(month="2026-10"))
        # When its result is awaited
        result = await job.result(timeout=20)
        # Then it is the handler's return value, and the job succeeded on its first attempt
        assert result == {"month": "2026-10", "total": 42}
        status = await app.jobs.get(job.id)
        assert status is not None
        assert status.state is JobState.SUCCEEDED
        assert status.attempt == 1
        assert status.queue == "sales"
        assert status.created_at is not None
        assert status.finished_at is not None
        assert status.started_at is not None
        assert status.started_at <= status.finished_at


async def test_a_job_failing_every_attempt_ends_failed_with_its_error(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    app, seen = make_app(tmp_path, store, vhost_url)
    async with running(app, vhost_url), app:
        job = await app.enqueue("reports", "report.sales", ReportRequest(month="x", fail=True))
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=30)
        assert failed.value.attempt == 3
        assert failed.value.error_type == "KeyError"
        assert seen["runs"] == 3
        status = await app.jobs.get(job.id)
        assert status is not None
        assert status.state is JobState.FAILED


async def test_progress_is_visible_while_the_job_runs_and_a_running_job_can_be_cancelled(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    app, _ = make_app(tmp_path, store, vhost_url)
    async with running(app, vhost_url), app:
        job = await app.enqueue("reports", "report.sales", ReportRequest(month="m", slow=10))

        async def progressed() -> Any:
            status = await app.jobs.get(job.id)
            return status if status and status.progress == 0.5 else None

        status = await until(progressed, "progress 0.5")
        assert status.state is JobState.RUNNING
        assert status.note == "half way"
        after = await job.cancel()
        assert after is not None
        assert after.cancel_requested
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)


async def test_a_queued_job_cancelled_is_acked_without_running(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    app, seen = make_app(tmp_path, store, vhost_url)
    async with running(app, vhost_url):
        pass  # the topology declared
    async with app:
        job = await app.enqueue("reports", "report.sales", ReportRequest(month="c"))
        status = await job.cancel()
        assert status is not None
        assert status.state is JobState.CANCELLED
        async with running(app, vhost_url):
            with pytest.raises(JobCancelled):
                await job.result(timeout=5)
            await asyncio.sleep(0.5)
        assert seen["runs"] == 0


async def test_a_result_not_ready_in_time_is_a_timeout(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    app, _ = make_app(tmp_path, store, vhost_url)
    async with running(app, vhost_url):
        pass  # the topology declared
    async with app:
        job = await app.enqueue("reports", "report.sales", ReportRequest(month="t"))
        with pytest.raises(JobTimeout) as late:
            await job.result(timeout=0.3)
        assert late.value.state == "queued"


async def test_a_thousand_jobs_each_end_in_its_exact_state(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    (tmp_path / "topology.toml").write_text(TOPOLOGY.replace("prefetch = 20", "prefetch = 100"))
    app = App(tmp_path / "topology.toml", url=vhost_url, jobs=store)
    runs: dict[int, list[int]] = {}

    @app.consumer("sales")
    async def build(req: dict[str, int], message: Message) -> dict[str, int]:
        n = req["n"]
        runs.setdefault(n, []).append(message.attempt)
        if n % 4 == 0:
            raise Reject("never")
        if n % 4 == 3 and message.attempt == 1:
            raise KeyError(n)
        return {"n": n}

    async with running(app, vhost_url):
        pass  # the topology declared
    async with app:
        # Given 1,000 jobs queued while no worker runs, a quarter of them cancelled
        jobs = [await app.enqueue("reports", "report.sales", {"n": n}) for n in range(1000)]
        for n in range(2, 1000, 4):
            await jobs[n].cancel()
        # When a worker runs them all
        async with running(app, vhost_url):

            async def all_finished() -> list[Any] | None:
                found = [await app.jobs.get(job.id) for job in jobs]
                return found if all(s is not None and s.state.finished for s in found) else None

            statuses = await until(all_finished, "every job finished", timeout=60)
    # Then each one is in exactly the state its handler made it
    expected = {
        0: (JobState.FAILED, 1),
        1: (JobState.SUCCEEDED, 1),
        2: (JobState.CANCELLED, 0),
        3: (JobState.SUCCEEDED, 2),
    }
    got = {n: (s.state, s.attempt) for n, s in enumerate(statuses)}
    assert got == {n: expected[n % 4] for n in range(1000)}
    assert all(s.result == {"n": n} for n, s in enumerate(statuses) if n % 4 in (1, 3))
    assert all(s.error_type == "rabbitflow.errors.Reject" for s in statuses[::4])
    assert not any(n % 4 == 2 for n in runs)  # no cancelled job ran


async def test_a_result_over_the_limit_fails_the_job_with_a_clear_error(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    app = App(
        tmp_path / "topology.toml",
        url=vhost_url,
        jobs=store.job_book(3_600_000, max_result_bytes=100),
    )

    @app.consumer("sales")
    async def build(req: dict[str, int]) -> str:
        return "x" * req["size"]

    async with running(app, vhost_url), app:
        small = await app.enqueue("reports", "report.sales", {"size": 10})
        large = await app.enqueue("reports", "report.sales", {"size": 1000})
        assert await small.result(timeout=10) == "x" * 10
        with pytest.raises(JobFailed) as failed:
            await large.result(timeout=10)
    # not truncated, not retried: failed at once with the reason
    assert failed.value.attempt == 1
    assert failed.value.error_type == "rabbitflow.errors.JobResultError"
    assert "1002 bytes of JSON, over the store's limit of 100 bytes" in str(failed.value.error)


async def test_a_job_between_attempts_is_retrying_with_its_error_and_next_due_time(
    tmp_path: Path, vhost_url: str, store: Any
) -> None:
    (tmp_path / "topology.toml").write_text(TOPOLOGY.replace('"200ms"', '"5s"'))
    app = App(tmp_path / "topology.toml", url=vhost_url, jobs=store)

    @app.consumer("sales")
    async def build(req: dict[str, int]) -> None:
        raise ValueError("downstream down")

    async with running(app, vhost_url), app:
        job = await app.enqueue("reports", "report.sales", {"n": 1})

        async def retrying() -> Any:
            status = await app.jobs.get(job.id)
            return status if status and status.state is JobState.RETRYING else None

        status = await until(retrying, "retrying")
    assert status.attempt == 1
    assert status.error == "ValueError: downstream down"
    assert status.due_at is not None
    assert status.created_at is not None
    assert 4 < (status.due_at - status.created_at).total_seconds() < 7


async def until(probe: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_result_is_waited_for_longer_than_the_stores_call_timeout(
    tmp_path: Path, vhost_url: str, kind: str
) -> None:
    # The wait is the caller's: a subscription quiet for longer than the store's call
    # timeout (500 ms here) is not a store that does not answer.
    name = uuid.uuid4().hex[:10]
    if kind == "redis":
        require_redis()
        store: Any = RedisStore(REDIS_URL, prefix=f"rf-test:{name}:", timeout="500ms")
    else:
        require_postgres()
        store = PostgresStore(POSTGRES_URL, table=f"rf_{name}", timeout="500ms")
    app, _ = make_app(tmp_path, store, vhost_url)
    try:
        async with running(app, vhost_url), app:
            job = await app.enqueue("reports", "report.sales", ReportRequest(month="w", slow=2))
            assert await job.result(timeout=15) == {"month": "w", "total": 42}
    finally:
        await store.close()
        if kind == "redis":
            await delete_prefix(REDIS_URL, f"rf-test:{name}:")
        else:
            await drop_table(POSTGRES_URL, f"rf_{name}_jobs")
            await drop_table(POSTGRES_URL, f"rf_{name}")


def test_a_tracked_consumer_without_a_job_store_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    app = App(tmp_path / "topology.toml")

    @app.consumer("sales")  # tracked by the file's track = true
    async def build(req: dict[str, int]) -> None: ...

    with pytest.raises(ConfigurationError, match=r"App\(..., jobs=RedisStore"):
        app.load_topology()


def test_track_false_on_the_decorator_overrides_the_file(tmp_path: Path) -> None:
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    app = App(tmp_path / "topology.toml")

    @app.consumer("sales", track=False)
    async def build(req: dict[str, int]) -> None: ...

    topology = app.load_topology()  # no store needed
    assert app.tracker("sales", topology) is None
