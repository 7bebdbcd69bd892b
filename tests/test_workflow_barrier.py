"""The chord barrier on each jobs store (memory, Redis, PostgreSQL): idempotent per member,
one claimant, told again until the callback is marked published, results in member order.
Concurrent members cannot both miss or both take the last place."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from rabbitflow import App
from rabbitflow.workflows._record import CLAIM, UNKNOWN, WAIT, FlowRecord
from rabbitflow.workflows._store import FlowStore, store_of
from tests.support.stores import dispose, make_store


@pytest.fixture(params=["memory", "redis", "postgres"])
async def flows(request: pytest.FixtureRequest) -> AsyncIterator[FlowStore]:
    made, token = await make_store(request.param, ttl="1h")
    app = App(jobs=made)
    try:
        store = store_of(app)
        assert store is not None
        yield store
    finally:
        await app.close()
        await dispose(request.param, made, token)


async def _chord(flows: FlowStore, members: int) -> str:
    flow = uuid.uuid4().hex
    steps = [(f"m{i}", "q") for i in range(members)] + [("c0", "cb")]
    await flows.create(FlowRecord(flow, "chord", steps, members=members), 3_600_000)
    return flow


async def test_the_member_that_completes_the_set_claims_until_published(flows: FlowStore) -> None:
    flow = await _chord(flows, 3)
    assert await flows.record(flow, 2, b'"c"') == WAIT
    assert await flows.record(flow, 0, b'"a"') == WAIT
    # a redelivered member: its first result is kept
    assert await flows.record(flow, 0, b'"changed"') == WAIT
    assert await flows.record(flow, 1, b'"b"') == CLAIM
    # the claimant redelivered (it died before marking the callback published) claims again;
    # any other member does not
    assert await flows.record(flow, 1, b'"b"') == CLAIM
    assert await flows.record(flow, 2, b'"c"') == WAIT
    assert await flows.results(flow) == [b'"a"', b'"b"', b'"c"']
    await flows.published(flow, finished=False)
    assert await flows.record(flow, 1, b'"b"') == WAIT


async def test_concurrent_members_elect_exactly_one_claimant(flows: FlowStore) -> None:
    for _ in range(5):
        flow = await _chord(flows, 20)
        answers = await asyncio.gather(*(flows.record(flow, i, b"1") for i in range(20)))
        assert answers.count(CLAIM) == 1
        assert answers.count(WAIT) == 19


async def test_an_unknown_workflow_is_said_so(flows: FlowStore) -> None:
    assert await flows.record(uuid.uuid4().hex, 0, b"1") == UNKNOWN


async def test_a_failed_member_that_succeeds_after_all_takes_the_workflow_back_to_running(
    flows: FlowStore,
) -> None:
    flow = await _chord(flows, 2)
    await flows.fail(flow, "m1", "RuntimeError: boom")
    record = await flows.get(flow)
    assert record is not None
    assert (record.state, record.failed) == ("failed", "m1")
    await flows.record(flow, 1, b"1")
    record = await flows.get(flow)
    assert record is not None
    assert (record.state, record.failed, record.error) == ("running", None, None)
    assert record.state_of("m1") == "succeeded"
