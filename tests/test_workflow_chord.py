"""Groups and chords against a real RabbitMQ and each jobs store: the callback runs once
with every result in member order; a workflow is a job (its state and each step's); a
member that ends in the DLQ fails the workflow naming it, and replaying it resumes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from pydantic import BaseModel, RootModel

from rabbitflow import App, Message, chain, chord, group, step
from rabbitflow.dlq import replay
from rabbitflow.idempotency import MemoryStore
from rabbitflow.jobs import JobStatus
from tests.support.spans import Spans, capture_spans
from tests.support.stores import dispose, make_store
from tests.support.waiting import eventually, wait_for
from tests.support.worker import running

pytestmark = pytest.mark.broker

TOPOLOGY = """
[defaults]
queue_type = "classic"
prefetch = 20
retry = { delays = ["100ms"], max_attempts = 2 }

[queues."thumbs.make"]
[queues."albums.done"]
[queues."albums.notify"]
[queues."etl.a"]
[queues."etl.b"]
[queues."etl.c"]
"""


class Img(BaseModel):
    id: int


class Thumb(BaseModel):
    id: int
    url: str


# A chord's callback takes the list of results; a RootModel validates each of them.
Thumbs = RootModel[list[Thumb]]
Count = RootModel[int]


@pytest.fixture(params=["memory", "redis", "postgres"])
async def jobs(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    made, token = await make_store(request.param, ttl="1h", lease="30s")
    try:
        yield made
    finally:
        await dispose(request.param, made, token)


def album_app(tmp_path: Path, store: object, callbacks: list[list[Thumb]], fail: set[int]) -> App:
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    app = App(topology=tmp_path / "topology.toml", name="albums", jobs=store)

    @app.consumer("thumbs.make")
    async def make(img: Img) -> Thumb:
        if img.id in fail:
            raise RuntimeError(f"cannot read image {img.id}")
        return Thumb(id=img.id, url=f"/t/{img.id}.png")

    @app.consumer("albums.done")
    async def done(thumbs: Thumbs, message: Message) -> int:
        callbacks.append(thumbs.root)
        return len(thumbs.root)

    @app.consumer("albums.notify")
    async def notify(count: Count) -> str:
        return f"{count.root} thumbnails"

    return app


async def test_a_chord_runs_its_callback_once_with_the_results_in_member_order(
    tmp_path: Path, vhost_url: str, jobs: object
) -> None:
    # Given a chord of 30 members whose callback is a chain of two steps
    callbacks: list[list[Thumb]] = []
    app = album_app(tmp_path, jobs, callbacks, fail=set())

    # When it runs
    async with running(app, vhost_url):
        flow = await app.start(
            chord(
                group(step("thumbs.make", Img(id=i)) for i in range(30)),
                chain(step("albums.done"), step("albums.notify")),
            )
        )
        status = await wait_for_state(app, flow.id, "succeeded")
        await app.close()

    # Then the callback ran once, with the 30 results in member order
    assert len(callbacks) == 1
    assert [thumb.id for thumb in callbacks[0]] == list(range(30))
    # and the workflow is a job: succeeded with the last step's result, each step succeeded
    assert status.result == "30 thumbnails"
    assert len(status.steps) == 32
    assert {s["state"] for s in status.steps} == {"succeeded"}
    assert [s["step"] for s in status.steps[-2:]] == ["c0", "c1"]


async def test_a_group_is_a_job_that_succeeds_when_every_member_did(
    tmp_path: Path, vhost_url: str
) -> None:
    callbacks: list[list[Thumb]] = []
    app = album_app(tmp_path, MemoryStore(), callbacks, fail=set())
    async with running(app, vhost_url):
        flow = await app.start(group(step("thumbs.make", Img(id=i)) for i in range(5)))
        status = await wait_for_state(app, flow.id, "succeeded")
        await app.close()
    assert [s["state"] for s in status.steps] == ["succeeded"] * 5
    assert callbacks == []


async def test_a_member_that_fails_every_attempt_fails_the_workflow_and_its_replay_resumes_it(
    tmp_path: Path, vhost_url: str, jobs: object
) -> None:
    # Given a chord whose member 3 fails every attempt
    callbacks: list[list[Thumb]] = []
    failing = {3}
    app = album_app(tmp_path, jobs, callbacks, fail=failing)

    async with running(app, vhost_url):
        flow = await app.start(
            chord(group(step("thumbs.make", Img(id=i)) for i in range(6)), step("albums.done"))
        )
        # Then the workflow fails, naming the member's step, its queue and its error
        failed = await wait_for_state(app, flow.id, "failed")
        assert failed.error is not None
        assert "m3 (thumbs.make)" in failed.error
        assert "cannot read image 3" in failed.error
        states = {s["step"]: s["state"] for s in failed.steps}
        assert states["m3"] == "failed"
        assert states["c0"] == "pending"
        assert callbacks == []

        # When the member's cause is fixed and its dead letter replayed
        failing.clear()
        connection = await aio_pika.connect(vhost_url)
        try:
            report = await replay(connection, "thumbs.make")
        finally:
            await connection.close()
        assert report.moved == 1

        # Then the workflow resumes: running again, then the callback runs once, with all six
        # results
        await wait_for(lambda: len(callbacks) == 1, "the callback after the replay", 10)
        status = await wait_for_state(app, flow.id, "succeeded")
        await app.close()
    assert [thumb.id for thumb in callbacks[0]] == list(range(6))
    assert {s["state"] for s in status.steps} == {"succeeded"}


async def test_cancelling_a_workflow_publishes_none_of_its_later_steps(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a chord whose member 0 fails until the workflow is cancelled
    callbacks: list[list[Thumb]] = []
    app = album_app(tmp_path, MemoryStore(), callbacks, fail={0})
    async with running(app, vhost_url):
        flow = await app.start(
            chord(group(step("thumbs.make", Img(id=i)) for i in range(3)), step("albums.done"))
        )
        await wait_for_state(app, flow.id, "failed")
        assert await flow.cancel()
        status = await wait_for_state(app, flow.id, "failed")  # failed stays failed
        assert status.state == "failed"
        await app.close()
    assert callbacks == []
    flows = await flow.status()
    assert flows is not None
    assert {s.state for s in flows.steps if s.step == "c0"} == {"cancelled"}


async def wait_for_state(app: App, flow_id: str, state: str) -> object:
    found: dict[str, object] = {}

    async def probe() -> bool:
        status = await app.jobs.get(flow_id)
        if status is not None and status.state.value == state:
            found["status"] = status
            return True
        return False

    await _until(probe, f"the workflow to be {state}", 15)
    return found["status"]


async def _until(probe: object, what: str, timeout: float) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not await probe():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_one_trace_per_workflow_and_the_callback_is_linked_to_every_member(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given tracing on, and a chord of 5 members whose callback is a chain of two steps
    callbacks: list[list[Thumb]] = []
    app = album_app(tmp_path, MemoryStore(), callbacks, fail=set())
    with capture_spans() as spans:
        async with running(app, vhost_url):
            flow = await app.start(
                chord(
                    group(step("thumbs.make", Img(id=i)) for i in range(5)),
                    chain(step("albums.done"), step("albums.notify")),
                )
            )
            await wait_for_state(app, flow.id, "succeeded")
            await app.close()
        members = spans.consumers("thumbs.make")
        [callback] = spans.consumers("albums.done")
        [notify] = spans.consumers("albums.notify")
        [joined] = spans.named(f"chord {flow.id} callback")

        # Then the callback's span descends from a span linked to each member's span
        linked = {link.context.span_id for link in joined.links}
        assert linked == {member.context.span_id for member in members}
        assert _ancestors(spans, callback) & {joined.context.span_id}
        # and the step after the callback is in the callback's trace, below its span
        assert notify.context.trace_id == callback.context.trace_id
        assert callback.context.span_id in _ancestors(spans, notify)


def _ancestors(spans: Spans, span: object) -> set[int]:
    found: set[int] = set()
    parent = span.parent  # type: ignore[attr-defined]
    while parent is not None:
        found.add(parent.span_id)
        try:
            parent = spans.by_id(parent.span_id).parent
        except StopIteration:  # the root: its parent is the caller's, not captured
            break
    return found


async def test_a_chain_with_a_store_is_a_job_and_cancelling_it_stops_its_next_steps(
    tmp_path: Path, vhost_url: str, jobs: object
) -> None:
    # Given a chain of three steps whose second waits until the test lets it go
    callbacks: list[list[Thumb]] = []
    app = album_app(tmp_path, jobs, callbacks, fail=set())
    release = asyncio.Event()
    seen: list[str] = []

    @app.consumer("etl.a")
    async def first(img: Img) -> Img:
        seen.append("a")
        return img

    @app.consumer("etl.b")
    async def second(img: Img) -> Img:
        seen.append("b")
        await release.wait()
        return img

    @app.consumer("etl.c")
    async def third(img: Img) -> str:
        seen.append("c")
        return "never"

    async with running(app, vhost_url):
        # When it runs to its second step and is cancelled there
        flow = await app.start(chain(step("etl.a", Img(id=1)), step("etl.b"), step("etl.c")))
        await wait_for(lambda: seen == ["a", "b"], "the second step", 10)

        async def first_done() -> JobStatus | None:
            # The first step's state is written just after it published the second step.
            status = await app.jobs.get(flow.id)
            done = status is not None and status.steps[0]["state"] == "succeeded"
            return status if done else None

        running_status = await eventually(first_done, "the first step's status", 10)
        assert await flow.cancel()
        release.set()
        await wait_for_state(app, flow.id, "cancelled")
        await asyncio.sleep(0.5)  # the third step would have run by now
        cancelled = await app.jobs.get(flow.id)
        await app.close()

    # Then the job was running with its first step done, and the third step never ran
    assert running_status is not None
    assert running_status.state.value == "running"
    assert [s["state"] for s in running_status.steps] == ["succeeded", "pending", "pending"]
    assert seen == ["a", "b"]
    assert cancelled is not None
    assert cancelled.state.value == "cancelled"
    assert [s["state"] for s in cancelled.steps] == ["succeeded", "succeeded", "cancelled"]
