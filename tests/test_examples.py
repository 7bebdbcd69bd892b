"""The examples in ``examples/`` (besides the orders service) work as their READMEs say.

The rate-limited consumer and the scheduled publishing example run on ``TestApp`` (virtual
time makes the retry tiers instant); the jobs API runs in-process through httpx's
``ASGITransport``, with its worker on ``TestApp`` and its job statuses in the real Redis, and
as processes (uvicorn, ``rabbitflow run``) against the real broker, and with the broker down.
The web worker example runs under uvicorn against the real broker.
"""

from __future__ import annotations

import asyncio
import email.utils
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.jobs_api import api as jobs_api
from examples.jobs_api import worker as jobs_worker
from examples.jobs_api.models import Report, ReportRequest
from examples.periodic import app as periodic_app
from examples.rate_limited import app as sms
from examples.rate_limited.gateway import SmsGateway
from rabbitflow import Retry
from rabbitflow.testing import TestApp
from tests.support.amqp import message_counts
from tests.support.network import free_port
from tests.support.processes import Workers
from tests.support.services import REDIS_URL, delete_prefix, require_redis
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
#
# The API in-process (httpx's ASGITransport) enqueues through the worker's App, which TestApp
# connects to the in-memory broker; job statuses are in the real Redis, under rabbitflow's
# default prefix (each test deletes the jobs it created). The subprocess tests serve the API with
# uvicorn, under a prefix of their own.


@pytest.fixture
async def client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    require_redis()
    monkeypatch.setattr(jobs_api, "app", jobs_worker.app)
    created: list[str] = []

    async def remember(response: httpx.Response) -> None:
        if response.request.method == "POST" and response.status_code == 202:
            await response.aread()
            created.append(response.json()["job_id"])

    transport = httpx.ASGITransport(app=jobs_api.api)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://jobs.test", event_hooks={"response": [remember]}
    ) as http:
        yield http
    for job_id in created:
        await delete_prefix(REDIS_URL, f"rabbitflow:jobs:*{job_id}")
    # The API's Redis connections belong to this test's event loop; the next test opens its own.
    await jobs_api.store.close()


async def status_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """``GET /jobs/{id}`` once the worker's pending status writes are written."""
    await jobs_worker.app.jobs.flush()
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_job_is_accepted_at_once_and_its_status_served_by_the_jobs_router(
    client: httpx.AsyncClient,
) -> None:
    async with TestApp(jobs_worker.app) as t:
        # when a client asks for a report
        response = await client.post("/jobs", json={"report": "sales", "month": "2026-10"})

        # then it gets a job id at once, and where to ask for its status
        assert response.status_code == 202
        job_id = response.json()["job_id"]
        assert response.json() == {"job_id": job_id, "state": "queued"}
        assert response.headers["location"] == f"/jobs/{job_id}"

        # and once the worker ran, the status has the handler's return value
        await t.drain()
        (run,) = t.handled("jobs.reports")
        assert run.message.message_id == job_id
        status = await status_of(client, job_id)
        assert (status["id"], status["state"], status["attempt"]) == (job_id, "succeeded", 1)
        assert status["result"]["url"] == f"/files/{job_id}.csv"
        assert status["queue"] == "jobs.reports"


async def test_a_failing_job_is_retrying_then_succeeds(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    render = jobs_worker.render_report

    def flaky(request: ReportRequest, job_id: str) -> Report:
        calls.append(job_id)
        if len(calls) == 1:
            raise ConnectionError("warehouse unreachable")
        return render(request, job_id)

    monkeypatch.setattr(jobs_worker, "render_report", flaky)
    async with TestApp(jobs_worker.app) as t:
        posted = await client.post("/jobs", json={"report": "inventory", "month": "2026-09"})
        job_id = posted.json()["job_id"]
        await t.advance("1s")  # the first attempt failed; the message waits in the 5s tier
        status = await status_of(client, job_id)
        assert (status["state"], status["attempt"], status["error_type"]) == (
            "retrying",
            1,
            "ConnectionError",
        )
        assert "warehouse unreachable" in status["error"]
        assert status["due_at"] is not None

        await t.drain()
        status = await status_of(client, job_id)
        assert (status["state"], status["attempt"]) == ("succeeded", 2)


async def test_a_job_failing_every_attempt_is_failed_and_dead_lettered(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(request: ReportRequest, job_id: str) -> Report:
        raise RuntimeError("report template missing")

    monkeypatch.setattr(jobs_worker, "render_report", broken)
    async with TestApp(jobs_worker.app) as t:
        posted = await client.post("/jobs", json={"report": "sales", "month": "2026-10"})
        job_id = posted.json()["job_id"]
        await t.drain()

        status = await status_of(client, job_id)
        assert (status["state"], status["attempt"]) == ("failed", 3)
        assert "report template missing" in status["error"]
        (dead,) = t.dead_letters("jobs.reports")
        assert dead.properties.message_id == job_id
        assert dead.headers["rabbitflow-error-type"] == "RuntimeError"


async def test_unknown_jobs_and_bad_requests(client: httpx.AsyncClient) -> None:
    async with TestApp(jobs_worker.app) as t:
        unknown = await client.get("/jobs/nope")
        assert (unknown.status_code, unknown.json()) == (404, {"detail": "no job 'nope'"})
        bad = await client.post("/jobs", json={"report": "sales", "month": "October"})
        assert bad.status_code == 422
        assert t.queue("jobs.reports").messages == []


@pytest.fixture
def jobs_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test Redis and a prefix of the test's own for the example's processes
    (``$JOBS_REDIS_URL``, ``$JOBS_PREFIX``)."""
    require_redis()
    prefix = f"rf-test:jobs-example:{uuid.uuid4().hex[:8]}:"
    monkeypatch.setenv("JOBS_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("JOBS_PREFIX", prefix)
    yield prefix
    asyncio.run(delete_prefix(REDIS_URL, prefix))


def redis_keys(prefix: str) -> list[bytes]:
    async def scan() -> list[bytes]:
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            return [key async for key in client.scan_iter(match=prefix + "*")]
        finally:
            await client.aclose()

    return asyncio.run(scan())


def test_with_the_broker_down_the_api_answers_503_and_keeps_no_job(
    tmp_path: Path, jobs_prefix: str
) -> None:
    # given the API served by uvicorn, with nothing listening on the broker's port
    server = WebProcess("examples.jobs_api.api:api", tmp_path / "uvicorn.log")
    server.env["RABBITFLOW_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    try:
        server.start()
        with server.client() as http:
            # when a client asks for a report
            response = http.post("/jobs", json={"report": "sales", "month": "2026-10"})
        server.stop()
    finally:
        server.kill()

    # then it is told to come back, and no job exists that would never run
    assert response.status_code == 503, server.output()
    assert response.headers["retry-after"] == "5"
    assert response.json() == {"detail": "the job queue is unavailable; try again"}
    assert "location" not in response.headers
    assert redis_keys(jobs_prefix) == []


@pytest.mark.broker
def test_the_api_and_the_worker_as_processes_on_a_real_broker(
    tmp_path: Path, vhost_url: str, jobs_prefix: str
) -> None:
    # given the worker under `rabbitflow run` and the API under uvicorn, in processes of their
    # own, sharing the broker and Redis
    workers = Workers(tmp_path, vhost_url)
    server = WebProcess("examples.jobs_api.api:api", tmp_path / "uvicorn.log")
    server.env["RABBITFLOW_URL"] = vhost_url
    try:
        workers.start("examples.jobs_api.worker:app", None)
        server.start()
        with server.client() as http:
            # when a client asks for a report, then polls where the API said
            accepted = http.post("/jobs", json={"report": "sales", "month": "2026-10"})
            assert accepted.status_code == 202
            location = accepted.headers["location"]

            def finished() -> dict[str, Any] | None:
                body: dict[str, Any] = http.get(location).json()
                return body if body["state"] == "succeeded" else None

            # then the job ends succeeded with the worker's result
            status = wait_until(finished, 15, "the job to succeed")
            assert status["result"]["url"] == f"/files/{accepted.json()['job_id']}.csv"
            assert http.get("/jobs/unknown").status_code == 404
        server.stop()
    finally:
        server.kill()
        workers.cleanup()
    assert "does not consume" not in server.output()  # the API's App has no consumers
    assert redis_keys(jobs_prefix)  # the processes kept the job under the test's prefix


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
