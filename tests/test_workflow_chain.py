"""Chains against a real RabbitMQ: each step's return value is the next step's input, the
rest of the chain travels in the message (no store), a mismatch dead-letters the step that
could not take it, and ``app.start`` refuses what it cannot run before publishing."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aio_pika
import pytest
from pydantic import BaseModel

from rabbitflow import App, Message, WorkflowError, chain, chord, group, step
from tests.support.topology import app_for
from tests.support.waiting import wait_for
from tests.support.worker import running

pytestmark = pytest.mark.broker

TOPOLOGY = """
[defaults]
queue_type = "classic"
retry = { delays = ["200ms", "1s"], max_attempts = 3 }

[queues."etl.extract"]
[queues."etl.transform"]
[queues."etl.load"]
"""


class Extract(BaseModel):
    source: int


class Rows(BaseModel):
    source: int
    rows: list[int]


class Total(BaseModel):
    source: int
    total: int


def etl_app(tmp_path: Path, seen: list[tuple[str, object, str | None]]) -> App:
    app = app_for(tmp_path, TOPOLOGY)

    @app.consumer("etl.extract")
    async def extract(req: Extract, message: Message) -> Rows:
        seen.append(("extract", req, message.message_id))
        return Rows(source=req.source, rows=[req.source, 2, 3])

    @app.consumer("etl.transform")
    async def transform(rows: Rows, message: Message) -> Total:
        seen.append(("transform", rows, message.message_id))
        return Total(source=rows.source, total=sum(rows.rows))

    @app.consumer("etl.load")
    async def load(total: Total, message: Message) -> str:
        seen.append(("load", total, message.message_id))
        return "loaded"

    return app


async def test_a_three_step_chain_passes_each_value_on(tmp_path: Path, vhost_url: str) -> None:
    # Given three consumers, each returning the next one's input
    seen: list[tuple[str, object, str | None]] = []
    app = etl_app(tmp_path, seen)

    # When a chain of the three is started (the app keeps no store)
    async with running(app, vhost_url):
        flow = await app.start(
            chain(step("etl.extract", Extract(source=1)), step("etl.transform"), step("etl.load"))
        )
        await wait_for(lambda: len(seen) == 3, "the three steps", 10)
        await app.close()

    # Then each step ran once, in order, on the value the step before returned
    assert [name for name, _, _ in seen] == ["extract", "transform", "load"]
    assert seen[1][1] == Rows(source=1, rows=[1, 2, 3])
    assert seen[2][1] == Total(source=1, total=6)
    # and each step's message is named by the workflow and its place in it
    assert [mid for _, _, mid in seen] == [f"{flow.id}-s0", f"{flow.id}-s1", f"{flow.id}-s2"]


async def test_a_value_the_next_step_cannot_take_dead_letters_that_step(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a step whose result is not what the next step's model takes
    app = app_for(tmp_path, TOPOLOGY)
    loaded: list[Total] = []

    @app.consumer("etl.extract")
    async def extract(req: Extract) -> dict[str, object]:
        return {"source": req.source, "rows": "not a list"}

    @app.consumer("etl.transform")
    async def transform(rows: Rows) -> Total:
        return Total(source=rows.source, total=sum(rows.rows))

    @app.consumer("etl.load")
    async def load(total: Total) -> None:
        loaded.append(total)

    # When the chain runs
    async with running(app, vhost_url):
        flow = await app.start(
            chain(step("etl.extract", Extract(source=7)), step("etl.transform"), step("etl.load"))
        )
        dead = await _one_dead_letter(vhost_url, "etl.transform.dlq")
        await app.close()

    # Then the transform step is in its DLQ as a DecodeError, at once (no retry), with the
    # rest of its chain still in its headers (a replay carries the workflow on)
    headers = dead.headers
    assert headers["rabbitflow-error-type"] == "rabbitflow.errors.DecodeError"
    assert "invalid Rows" in str(headers["rabbitflow-error-message"])
    assert headers["rabbitflow-attempt"] == 1
    assert dead.message_id == f"{flow.id}-s1"
    slip = json.loads(str(headers["rabbitflow-workflow"]))
    assert slip["r"] == [["etl.load", 0]]
    assert loaded == []


async def test_a_delayed_step_waits_after_the_step_before(tmp_path: Path, vhost_url: str) -> None:
    seen: list[tuple[str, object, str | None]] = []
    app = etl_app(tmp_path, seen)
    at: dict[str, float] = {}

    async with running(app, vhost_url):
        started = time.time()
        await app.start(
            chain(
                step("etl.extract", Extract(source=2)),
                step("etl.transform", delay="1500ms"),
                step("etl.load"),
            )
        )
        await wait_for(lambda: len(seen) == 3, "the three steps", 10)
        at["done"] = time.time()
        await app.close()
    assert at["done"] - started >= 1.5


@pytest.mark.parametrize(
    ("flow", "words"),
    [
        (lambda: chain(step("a", 1), chord(group(step("b", 2)), step("c"))), "cannot be a chord"),
        (lambda: chain(step("a", 1), step("b", 2)), "takes the return value"),
        (lambda: chord(group(step("a")), step("c")), "has no payload"),
        (lambda: chord([step("a", 1)], step("c", 5)), "takes the return value"),
        (lambda: group(chain(step("a", 1), step("b"))), "cannot be a chain"),
        (lambda: step("a", 1, delay="soon"), "not a duration"),
    ],
)
async def test_what_start_cannot_run_is_refused_before_anything_is_published(
    vhost_url: str, flow: object, words: str
) -> None:
    app = App(url=vhost_url)
    try:
        with pytest.raises(WorkflowError, match=words):
            await app.start(flow())  # type: ignore[operator]
    finally:
        await app.close()


async def _one_dead_letter(url: str, queue: str) -> aio_pika.abc.AbstractIncomingMessage:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        dlq = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = await dlq.get(no_ack=True, fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"nothing in {queue}")
    finally:
        await connection.close()
