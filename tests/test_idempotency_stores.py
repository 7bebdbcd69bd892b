"""The idempotency stores keep one contract: claim with a lease → done for a ttl.

Run against the real Redis and PostgreSQL (``RABBITFLOW_TEST_REDIS``, default 127.0.0.1:6379;
``RABBITFLOW_TEST_POSTGRES``, default 127.0.0.1:5432, database ``test``), each test under its own
key prefix / table; skipped without them, failed in CI (``tests/support/services.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from rabbitflow import App, Message
from rabbitflow._outcome import Action, OutcomePolicy
from rabbitflow.idempotency import (
    ClaimState,
    IdempotencyStore,
    MemoryStore,
    PostgresStore,
)
from rabbitflow.idempotency._guard import InProgress
from rabbitflow.testing import TestApp
from rabbitflow.topology import derive, parse_topology
from tests.support.services import (
    POSTGRES_URL,
)
from tests.support.stores import dispose, make_store


@pytest.fixture(params=["memory", "redis", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    made, token = await make_store(request.param, ttl="1h", lease="30s")
    try:
        yield made
    finally:
        await dispose(request.param, made, token)


async def test_a_new_key_is_claimed_then_busy_for_others_then_done(
    store: IdempotencyStore,
) -> None:
    assert (await store.claim("q:m1", "a", 30_000)).state is ClaimState.CLAIMED

    busy = await store.claim("q:m1", "b", 30_000)
    assert busy.state is ClaimState.BUSY
    assert 0 < busy.retry_after_ms <= 30_000

    await store.complete("q:m1", "a", 3_600_000)
    assert (await store.claim("q:m1", "c", 30_000)).state is ClaimState.DONE
    assert (await store.claim("q:m2", "c", 30_000)).state is ClaimState.CLAIMED


async def test_a_released_claim_can_be_taken_at_once_but_only_its_owner_releases_it(
    store: IdempotencyStore,
) -> None:
    await store.claim("q:m1", "a", 30_000)
    await store.release("q:m1", "intruder")
    assert (await store.claim("q:m1", "b", 30_000)).state is ClaimState.BUSY

    await store.release("q:m1", "a")
    assert (await store.claim("q:m1", "b", 30_000)).state is ClaimState.CLAIMED


async def test_a_claim_whose_holder_died_expires_with_its_lease(
    store: IdempotencyStore,
) -> None:
    # Given a claim by a process that then died (it never completes nor releases)
    await store.claim("q:m1", "dead", 300)
    assert (await store.claim("q:m1", "b", 300)).state is ClaimState.BUSY
    # When its lease is over, another consumer takes the key
    await asyncio.sleep(0.45)
    assert (await store.claim("q:m1", "b", 30_000)).state is ClaimState.CLAIMED
    # And the late holder cannot release the new claim
    await store.release("q:m1", "dead")
    assert (await store.claim("q:m1", "c", 30_000)).state is ClaimState.BUSY


async def test_a_done_key_is_forgotten_after_its_ttl(store: IdempotencyStore) -> None:
    await store.claim("q:m1", "a", 30_000)
    await store.complete("q:m1", "a", 300)
    assert (await store.claim("q:m1", "b", 30_000)).state is ClaimState.DONE
    await asyncio.sleep(0.45)
    assert (await store.claim("q:m1", "b", 30_000)).state is ClaimState.CLAIMED


async def test_of_many_racing_claims_exactly_one_wins(store: IdempotencyStore) -> None:
    results = await asyncio.gather(
        *(store.claim("q:race", f"owner-{n}", 30_000) for n in range(25))
    )
    states = [result.state for result in results]
    assert states.count(ClaimState.CLAIMED) == 1
    assert states.count(ClaimState.BUSY) == 24


async def test_each_store_is_an_idempotency_store(store: IdempotencyStore) -> None:
    assert isinstance(store, IdempotencyStore)
    assert store.ttl_ms == 3_600_000
    assert store.lease_ms == 30_000


def test_durations_are_checked() -> None:
    assert MemoryStore(ttl="7d").ttl_ms == 7 * 86_400_000
    with pytest.raises(ValueError, match="lease"):
        MemoryStore(ttl="1s", lease="1m")
    with pytest.raises(ValueError, match="duration"):
        MemoryStore(ttl="soon")
    with pytest.raises(ValueError, match="identifier"):
        PostgresStore(POSTGRES_URL, table="bad; drop table x")


@pytest.mark.parametrize("kind", ["memory", "redis", "postgres"])
async def test_cost_per_message(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One claim and one complete per message, sequentially: the cost a handler pays."""
    made, token = await make_store(kind)
    try:
        count = 300
        await made.claim("warm", "w", 30_000)  # connect, create the table
        started = time.perf_counter()
        for n in range(count):
            await made.claim(f"q:{n}", "o", 30_000)
            await made.complete(f"q:{n}", "o", 60_000)
        per_message = (time.perf_counter() - started) / count
    finally:
        await dispose(kind, made, token)
    with capsys.disabled():
        print(f"\n{kind} store: {per_message * 1e6:.0f} µs per message (claim + complete)")
    assert per_message < 0.05


@pytest.mark.parametrize("kind", ["memory", "redis", "postgres"])
async def test_each_store_deduplicates_through_the_dispatcher(kind: str) -> None:
    made, token = await make_store(kind, ttl="1h", lease="30s")
    app = App(idempotency=made)
    runs: list[str] = []

    @app.consumer("billing", idempotent=True)
    async def bill(order: dict[str, int], message: Message) -> None:
        runs.append(message.message_id or "-")
        if order["fail"] and runs.count(message.message_id or "-") == 1:
            raise ConnectionError("first run fails")  # released, then retried

    topology = parse_topology('[queues.billing]\nretry = { delays = ["1s"] }\n')
    try:
        async with TestApp(app, topology) as t:
            for n, fail in ((1, 0), (1, 0), (2, 1), (2, 1), (1, 0)):
                await t.publish("", "billing", {"n": n, "fail": fail}, message_id=f"m-{n}")
            await t.drain()
            assert sorted(runs) == ["m-1", "m-2", "m-2"]  # m-2: the failed run and its retry
            assert t.dead_letters("billing") == []
    finally:
        await dispose(kind, made, token)


def test_a_duplicate_waiting_for_its_twin_spends_no_attempt() -> None:
    # Given a queue with two attempts, a duplicate on its last attempt finds its twin's claim
    config = parse_topology('[queues.billing]\nretry = { delays = ["1s"] }\n')
    policy = OutcomePolicy(config.queues["billing"].retry, derive(config).routes["billing"])
    waiting = InProgress("billing", "m-1", retry_after_ms=4_000)

    plan = policy.decide(waiting, attempt=2)

    # Then it waits in a tier until the lease ends instead of going to the DLQ, attempt kept
    assert (plan.action, plan.attempt, plan.tier) == (Action.DEFER, 2, "billing.retry.1s")
    assert plan.not_before is not None
    # while a real failure on the last attempt is dead-lettered
    assert policy.decide(ConnectionError("down"), attempt=2).action is Action.DEAD_LETTER
