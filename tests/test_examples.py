"""The examples in ``examples/`` (besides the orders service) work as their READMEs say.

The rate-limited consumer and the scheduled publishing example run on ``TestApp`` (virtual
time makes the retry tiers instant); the jobs API runs in-process through httpx's
``ASGITransport``, with its worker on ``TestApp``, and once against the real broker.
"""

from __future__ import annotations

import email.utils
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from examples.jobs_api import api as jobs_api
from examples.jobs_api import worker as jobs_worker
from examples.jobs_api.models import ReportJob
from examples.jobs_api.store import JobStore
from examples.periodic import app as periodic_app
from examples.rate_limited import app as sms
from examples.rate_limited.gateway import SmsGateway
from rabbitflow import Retry
from rabbitflow.connection import connect
from rabbitflow.testing import TestApp
from rabbitflow.topology import derive, load_topology
from rabbitflow.topology._declare import declare
from tests.support.amqp import message_counts
from tests.support.network import free_port
from tests.support.waiting import wait_until
from tests.support.web import WebProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# -- rate_limited ----------------------------------------------------------------------------


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> SmsGateway:
    """A fresh stub provider: 2 messages per 10 s."""
    stub = SmsGateway(limit=2, window=10.0)
    monkeypatch.setattr(sms, "gateway", stub)
    return stub


async def test_a_429_is_retried_no_earlier_than_its_retry_after(gateway: SmsGateway) -> None:
    # given a provider that takes 2 messages per 10 s window
    async with TestApp(sms.app) as t:
        # when 3 messages arrive at once
        for n in range(3):
            await t.publish("notifications", "sms", sms.Sms(to=f"+1555010{n}", text="hi"))
        await t.drain()

        # then the third got a 429 with Retry-After 10, and was sent 10 s later, once
        statuses = [(r.to, r.status, r.retry_after) for r in gateway.requests]
        assert statuses == [
            ("+15550100", 202, None),
            ("+15550101", 202, None),
            ("+15550102", 429, "10"),
            ("+15550102", 202, None),
        ]
        limited, sent = gateway.requests[2], gateway.requests[3]
        assert sent.at - limited.at >= 10
        runs = [(h.payload.to, h.attempt) for h in t.handled("notifications.sms")]
        assert runs[2:] == [("+15550102", 1), ("+15550102", 2)]
        error = t.handled("notifications.sms")[2].error
        assert isinstance(error, Retry)
        assert error.delay_ms == 10_000
        assert t.clock.now_ms() == 10_000  # the 10s tier, in virtual time
        assert t.dead_letters("notifications.sms") == []


async def test_a_retry_after_beyond_the_largest_tier_is_still_honoured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given a provider that takes 1 message per 5 minutes, more than the largest tier (2m)
    stub = SmsGateway(limit=1, window=300.0)
    monkeypatch.setattr(sms, "gateway", stub)
    async with TestApp(sms.app) as t:
        await t.publish("notifications", "sms", sms.Sms(to="+15550100", text="first"))
        await t.publish("notifications", "sms", sms.Sms(to="+15550101", text="second"))
        await t.drain()

        # then the second runs again no earlier than 300 s later, as its second attempt
        limited, sent = stub.requests[1], stub.requests[2]
        assert (limited.status, limited.retry_after, sent.status) == (429, "300", 202)
        assert 300 <= sent.at - limited.at < 300 + 30
        second = [h.attempt for h in t.handled("notifications.sms") if h.payload.to == "+15550101"]
        assert second == [1, 2]
        assert t.dead_letters("notifications.sms") == []


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_800_000_000.0
    in_90s = email.utils.formatdate(now + 90, usegmt=True)
    assert sms.retry_after("120", now) == 120.0
    assert sms.retry_after(in_90s, now) == 90.0
    assert sms.retry_after(email.utils.formatdate(now - 5, usegmt=True), now) == 0.0
    assert sms.retry_after("soon", now) == sms.DEFAULT_WAIT
    assert sms.retry_after(None, now) == sms.DEFAULT_WAIT


# -- periodic --------------------------------------------------------------------------------


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    reports: dict[str, Any] = {}
    monkeypatch.setattr(periodic_app, "built", reports)
    return reports


async def test_a_scheduled_tick_is_built_once_even_when_published_twice(
    built: dict[str, Any],
) -> None:
    at = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)
    async with TestApp(periodic_app.app) as t:
        first = await t.tick(periodic_app.request_sales_report, at=at)
        again = await t.tick(periodic_app.request_sales_report, at=at)  # a takeover's repeat
        await t.drain()
        assert (
            first == again == "examples.periodic.app.request_sales_report@2026-10-01T12:00:00.000Z"
        )
        assert list(built) == [first]
        assert len(t.handled("reports.requested")) == 2


async def test_the_cleanup_tick_is_skipped_on_the_first_of_the_month(
    built: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    class FirstOfMonth(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> FirstOfMonth:  # type: ignore[override]
            return cls(2026, 10, 1, 1, 0, tzinfo=UTC)

    monkeypatch.setattr(periodic_app, "datetime", FirstOfMonth)
    async with TestApp(periodic_app.app) as t:
        assert await t.tick(periodic_app.request_cleanup) is None
        await t.drain()
        assert built == {}


# -- jobs_api --------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobStore:
    """The example's store on a fresh SQLite file."""
    fresh = JobStore(tmp_path / "jobs.sqlite3")
    monkeypatch.setattr(jobs_api, "store", fresh)
    monkeypatch.setattr(jobs_worker, "store", fresh)
    return fresh


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=jobs_api.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobs.test") as http:
        yield http


async def test_a_job_is_accepted_at_once_and_done_in_the_background(
    store: JobStore, client: httpx.AsyncClient
) -> None:
    async with TestApp(jobs_worker.app) as t:
        # when a client asks for a report
        response = await client.post("/jobs", json={"report": "sales", "month": "2026-10"})

        # then it gets a job id at once, before the work is done
        assert response.status_code == 202
        job = response.json()
        assert job["status"] == "queued"
        assert response.headers["location"] == f"/jobs/{job['job_id']}"

        # and once the worker ran, the status lookup has the result
        await t.drain()
        (run,) = t.handled("jobs.reports")
        assert run.message.message_id == job["job_id"]
        status = (await client.get(f"/jobs/{job['job_id']}")).json()
        assert status["status"] == "succeeded"
        assert status["attempt"] == 1
        assert status["result"]["url"] == f"/files/{job['job_id']}.csv"


async def test_a_failing_job_is_retrying_then_succeeds(
    store: JobStore, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    render = jobs_worker.render_report

    def flaky(job: ReportJob) -> dict[str, Any]:
        calls.append(job.job_id)
        if len(calls) == 1:
            raise ConnectionError("warehouse unreachable")
        return render(job)

    monkeypatch.setattr(jobs_worker, "render_report", flaky)
    async with TestApp(jobs_worker.app) as t:
        posted = await client.post("/jobs", json={"report": "inventory", "month": "2026-09"})
        job_id = posted.json()["job_id"]
        await t.advance("1s")  # the first attempt failed; the message waits in the 5s tier
        status = (await client.get(f"/jobs/{job_id}")).json()
        assert (status["status"], status["error"]) == (
            "retrying",
            "ConnectionError: warehouse unreachable",
        )

        await t.drain()
        status = (await client.get(f"/jobs/{job_id}")).json()
        assert (status["status"], status["attempt"]) == ("succeeded", 2)


async def test_a_job_failing_every_attempt_is_failed_and_dead_lettered(
    store: JobStore, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(job: ReportJob) -> dict[str, Any]:
        raise RuntimeError("report template missing")

    monkeypatch.setattr(jobs_worker, "render_report", broken)
    async with TestApp(jobs_worker.app) as t:
        posted = await client.post("/jobs", json={"report": "sales", "month": "2026-10"})
        job_id = posted.json()["job_id"]
        await t.drain()

        status = (await client.get(f"/jobs/{job_id}")).json()
        assert (status["status"], status["attempt"]) == ("failed", 3)
        (dead,) = t.dead_letters("jobs.reports")
        assert dead.properties.message_id == job_id
        assert dead.headers["rabbitflow-error-type"] == "RuntimeError"


async def test_unknown_jobs_and_bad_requests(store: JobStore, client: httpx.AsyncClient) -> None:
    async with TestApp(jobs_worker.app) as t:
        assert (await client.get("/jobs/nope")).status_code == 404
        bad = await client.post("/jobs", json={"report": "sales", "month": "October"})
        assert bad.status_code == 422
        assert t.queue("jobs.reports").messages == []


async def test_with_the_broker_down_the_api_answers_503_and_records_the_job_failed(
    store: JobStore, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on the broker's port: the publish fails to connect.
    monkeypatch.setattr(jobs_worker.app, "url", f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    try:
        response = await client.post("/jobs", json={"report": "sales", "month": "2026-10"})
    finally:
        await jobs_worker.app.close()

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == {"detail": "the job queue is unavailable; try again"}
    with sqlite3.connect(store.path) as db:
        ((job_id,),) = db.execute("select job_id from jobs").fetchall()
    job = store.get(job_id)
    assert job is not None
    assert job.status == "failed"
    assert job.error is not None
    assert job.error.startswith("not enqueued: publish to exchange 'jobs' with routing key")
    assert "cannot connect to amqp://guest:***@127.0.0.1:" in job.error


@pytest.mark.broker
async def test_the_api_enqueues_on_a_real_broker(
    store: JobStore, client: httpx.AsyncClient, vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = load_topology(EXAMPLES / "jobs_api" / "topology.toml")
    connection = await connect(vhost_url)
    async with connection:
        await declare(connection, derive(topology))
        monkeypatch.setattr(jobs_worker.app, "url", vhost_url)
        try:
            response = await client.post("/jobs", json={"report": "sales", "month": "2026-10"})
        finally:
            await jobs_worker.app.close()
        assert response.status_code == 202
        job_id = response.json()["job_id"]

        channel = await connection.channel()
        queue = await channel.get_queue("jobs.reports", ensure=False)
        message = await queue.get(timeout=5)
        assert isinstance(message, aio_pika.abc.AbstractIncomingMessage)
        assert message.message_id == job_id
        assert ReportJob.model_validate_json(message.body).job_id == job_id
        await message.ack()
    assert store.get(job_id) is not None


# -- web_worker ------------------------------------------------------------------------------


@pytest.mark.broker
def test_the_web_worker_sends_welcomes_from_the_web_process(tmp_path: Path, vhost_url: str) -> None:
    # given the sign-up API served by uvicorn, consuming in the same process
    server = WebProcess("examples.web_worker.app:api", tmp_path / "uvicorn.log")
    server.env["RABBITFLOW_URL"] = vhost_url
    try:
        server.start()
        with server.client() as http:
            assert http.get("/readyz").json()["state"] == "consuming"

            # when three people sign up (and one request is malformed)
            for n in range(3):
                created = http.post("/signups", json={"email": f"u{n}@example.com", "name": "U"})
                assert created.status_code == 202
            assert http.post("/signups", json={"email": "nope", "name": "U"}).status_code == 422

            # then the web process itself sends the three welcomes
            wait_until(
                lambda: http.get("/stats").json()["welcomes_sent"] == 3, 10, "three welcomes"
            )
        server.stop()
    finally:
        server.kill()
    assert message_counts(vhost_url, ["signups.welcome"]) == {"signups.welcome": 0}
    assert "does not consume" not in server.output()
