"""``app.publish(..., delay=)``: delivered to the handler no earlier than asked, through the
queue's retry tiers and ``rabbitflow-not-before``, against a real RabbitMQ.

Times are wall-clock (``time.time()``) on both sides: the not-before is a wall-clock time.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from rabbitflow import App, Message
from rabbitflow.idempotency import MemoryStore
from tests.support.topology import app_for
from tests.support.waiting import wait_for
from tests.support.worker import running

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TOPOLOGY = """
[queues.later]
queue_type = "{queue_type}"
prefetch = 50
retry = {{ delays = ["1s", "10s"], max_attempts = 3 }}
"""


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_hundred_delayed_messages_none_delivered_early(
    tmp_path: Path, vhost_url: str, queue_type: str
) -> None:
    # Given a queue with tiers of 1s and 10s, and a handler that notes when each message runs
    app = app_for(tmp_path, TOPOLOGY.format(queue_type=queue_type))
    ran: dict[str, list[float]] = {}

    @app.consumer("later")
    async def later(message: Message) -> None:
        ran.setdefault(message.message_id or "", []).append(time.time())

    # When 100 messages are published with a 2 s delay
    published: dict[str, float] = {}
    async with running(app, vhost_url):
        publisher = App(url=vhost_url)
        try:
            for i in range(100):
                published[f"m{i}"] = time.time()
                await publisher.publish("", "later", {"i": i}, message_id=f"m{i}", delay="2s")
        finally:
            await publisher.close()
        await wait_for(lambda: len(ran) == 100, "the 100 delayed messages", 15)

    # Then each ran once, none before 2.000 s after its publish began, and none far past it
    waits = [ran[key][0] - published[key] for key in published]
    assert all(len(runs) == 1 for runs in ran.values())
    assert min(waits) >= 2.0, min(waits)
    assert max(waits) < 3.0, max(waits)  # not a whole extra tier (a tier overshoot is 1 s)


async def test_a_delay_shorter_than_every_tier_waits_its_own_time(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given tiers of 1s and 10s
    app = app_for(tmp_path, TOPOLOGY.format(queue_type="quorum"))
    ran: dict[str, float] = {}

    @app.consumer("later")
    async def later(message: Message) -> None:
        ran[message.message_id or ""] = time.time()

    # When messages are published 300 ms, 1.5 s and (a timedelta) 0 s ahead
    published: dict[str, float] = {}
    delays = {"short": "300ms", "between": 1500, "none": timedelta(0)}
    async with running(app, vhost_url):
        publisher = App(url=vhost_url)
        try:
            for key, delay in delays.items():
                published[key] = time.time()
                await publisher.publish("", "later", {}, message_id=key, delay=delay)
        finally:
            await publisher.close()
        await wait_for(lambda: len(ran) == 3, "the delayed messages", 10)

    # Then each waits its own delay, not the next tier's: the last hop is a per-message TTL
    waited = {key: ran[key] - published[key] for key in delays}
    assert 0.3 <= waited["short"] < 0.8, waited
    assert 1.5 <= waited["between"] < 2.0, waited
    assert waited["none"] < 0.5, waited


async def test_a_delay_that_is_not_a_duration_is_refused_before_publishing(
    vhost_url: str,
) -> None:
    publisher = App(url=vhost_url)
    try:
        with pytest.raises(ValueError, match="soon"):
            await publisher.publish("", "later", {}, delay="soon")
        with pytest.raises(ValueError, match="negative"):
            await publisher.publish("", "later", {}, delay=-5)
    finally:
        await publisher.close()


async def test_a_delayed_job_stays_queued_until_it_runs(tmp_path: Path, vhost_url: str) -> None:
    # Given a tracked consumer and a job enqueued with a 1.5 s delay
    app_for(tmp_path, TOPOLOGY.format(queue_type="quorum"))  # writes topology.toml
    app = App(topology=tmp_path / "topology.toml", name="delayed-jobs", jobs=MemoryStore())
    ran: list[float] = []

    @app.consumer("later", track=True)
    async def later(message: Message) -> str:
        ran.append(time.time())
        return "done"

    async with running(app, vhost_url):
        enqueued = time.time()
        job = await app.enqueue("", "later", {}, delay="1500ms")
        status = await app.jobs.get(job.id)
        assert status is not None
        assert status.state.value == "queued"
        # Then it runs once, no earlier than asked, and succeeds
        assert await job.result(timeout=10) == "done"
        await app.close()
    assert len(ran) == 1
    assert ran[0] - enqueued >= 1.5
