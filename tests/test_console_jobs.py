"""The console's job page (``rabbitflow console --jobs URL``) over HTTP, against a real
broker and a job store: a job's state, attempt, progress, error and result; the link from a
failed job to its dead letter; a replay from the console that queues the job again."""

from __future__ import annotations

import html
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rabbitflow.console import ConsoleSettings, create_app
from rabbitflow.idempotency import MemoryStore
from rabbitflow.jobs import Book, Change, JobState
from rabbitflow.jobs import _change as c
from rabbitflow.topology import Topology
from tests.test_console import DECLINED, DLQ, Q, csrf, dead_letter, failed, message_ids
from tests.test_console import topology as topology  # the fixture

pytestmark = pytest.mark.broker


@pytest.fixture
def book() -> Book:
    return MemoryStore().job_book(3_600_000)


@pytest.fixture
async def http(vhost_url: str, topology: Topology, book: Book) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ConsoleSettings(url=vhost_url, topology=topology, jobs=book))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8025"
    )
    yield client
    await client.aclose()
    await app.state.console.link.close()


async def record(book: Book, *changes: Change) -> None:
    for change in changes:
        book.record(change)
    await book.flush()


def change(job_id: str, kind: str, attempt: int = 1, **extra: Any) -> Change:
    return Change(job_id, kind, time.time(), attempt, extra.pop("queue", Q), **extra)


async def test_a_running_job_shows_its_attempt_and_progress(
    http: httpx.AsyncClient, book: Book
) -> None:
    await book.record_queued("job-1")
    await record(
        book,
        change("job-1", c.RUNNING, 2),
        change("job-1", c.PROGRESS, 2, progress=0.25, note="a <quarter>"),
    )
    page = await http.get("/jobs", params={"id": "job-1"})
    assert page.status_code == 200
    assert '<h1 id="state" class="state-running">running</h1>' in page.text
    assert '<code id="attempt">2</code>' in page.text
    assert '<progress max="100" value="25"></progress> <code>25%</code>' in page.text
    assert "a &lt;quarter&gt;" in page.text  # escaped


async def test_a_succeeded_job_shows_its_result(http: httpx.AsyncClient, book: Book) -> None:
    await record(
        book,
        change("job-2", c.RUNNING),
        change("job-2", c.SUCCEEDED, result='{"total": 42, "html": "<b>"}'),
    )
    page = (await http.get("/jobs", params={"id": "job-2"})).text
    assert "state-succeeded" in page
    shown = html.unescape(page)
    assert '"html": "<b>"' in shown
    assert "<b>" not in page  # escaped
    assert '"total": 42' in shown


async def test_a_failed_job_links_to_its_dead_letter_and_a_replay_queues_it_again(
    http: httpx.AsyncClient, book: Book, vhost_url: str
) -> None:
    # Given a job failed for good, its message in the DLQ
    await dead_letter(vhost_url, failed(1, DECLINED))
    await record(
        book,
        change("m-1", c.RUNNING, 3),
        change("m-1", c.FAILED, 3, error="PaymentDeclined: card", error_type=DECLINED),
    )
    page = (await http.get("/jobs", params={"id": "m-1"})).text
    assert "state-failed" in page
    assert "PaymentDeclined: card" in page
    link = f'<a id="dead-letter" href="/dlq/{Q}/message?key=id:m-1">'
    assert link in page
    # the link opens the dead letter's page
    letter = await http.get(f"/dlq/{Q}/message", params={"key": "id:m-1"})
    assert letter.status_code == 200

    # When it is replayed from the console
    token = csrf((await http.get(f"/dlq/{Q}")).text)
    form = {"csrf": token, "scope": "selected", "key": "id:m-1", "confirm": "yes"}
    done = await http.post(f"/actions/replay/{Q}", data=form)
    assert done.status_code == 303

    # Then the message is back in its queue, and its job queued again
    status = await book.get("m-1")
    assert status is not None
    assert status.state is JobState.QUEUED
    assert await message_ids(vhost_url, Q) == ["m-1"]
    assert await message_ids(vhost_url, DLQ) == []


async def test_an_unknown_job_is_a_404_naming_it(http: httpx.AsyncClient) -> None:
    page = await http.get("/jobs", params={"id": "<nope>"})
    assert page.status_code == 404
    assert "no job '<nope>' (unknown, or expired after the jobs ttl)" in page.text
    assert page.headers["content-type"].startswith("text/plain")  # never rendered as HTML


async def test_the_form_asks_for_an_id(http: httpx.AsyncClient) -> None:
    page = await http.get("/jobs")
    assert page.status_code == 200
    assert 'name="id"' in page.text
    assert '<a class="meta" href="/jobs">jobs</a>' in page.text


async def test_without_a_job_store_there_is_no_job_page(
    vhost_url: str,
    topology: Topology,
) -> None:
    app = create_app(ConsoleSettings(url=vhost_url, topology=topology))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8025"
    ) as client:
        page = await client.get("/jobs", params={"id": "x"})
    await app.state.console.link.close()
    assert page.status_code == 404
    assert "--jobs URL" in page.text
