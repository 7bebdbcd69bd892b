"""When the idempotency store does not answer: one error type, a short deadline, calls that
do not wait for each other, and a message that waits without spending an attempt.

Against the real Redis (6379) and PostgreSQL (5432, database ``test``) where a live server
is needed; "unreachable" is a port nothing listens on, "hung" a local server that accepts
and never answers. The outages of a running worker are in
``tests/reliability/test_store_outages.py`` (chaos stage).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from rabbitflow import App, Message, StoreUnavailableError
from rabbitflow._breaker import Dependency
from rabbitflow._metrics import Value
from rabbitflow._outcome import Action, OutcomePolicy
from rabbitflow.idempotency import ClaimResult, Guard, PostgresStore, RedisStore
from rabbitflow.idempotency._store import CLAIMED
from rabbitflow.testing import TestApp
from rabbitflow.topology import derive, parse_topology
from tests.support.network import free_port, silent_server
from tests.support.services import (
    POSTGRES_URL,
    REDIS_URL,
    delete_prefix,
    drop_table,
    require_postgres,
    require_redis,
)


@pytest.fixture
async def hung_port() -> AsyncIterator[int]:
    """A server that accepts connections and never answers (a hung store)."""
    async with silent_server() as port:
        yield port


async def failure(call: Callable[[], object]) -> tuple[StoreUnavailableError, float]:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        await call()  # type: ignore[misc]
    return caught.value, time.monotonic() - started


# -- one error type, at the store's border --------------------------------------------------


async def test_an_unreachable_redis_is_a_store_error_at_once() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        error, took = await failure(lambda: store.claim("q:m", "a", 1000))
    finally:
        await store.close()
    assert error.store is store
    assert error.operation == "claim"
    assert type(error.cause).__module__.startswith("redis")
    assert error.__cause__ is error.cause
    assert took < 1.0


async def test_a_hung_redis_fails_at_the_store_deadline(hung_port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{hung_port}/0", timeout="300ms")
    try:
        error, took = await failure(lambda: store.claim("q:m", "a", 1000))
    finally:
        await store.close()
    assert isinstance(error.cause, TimeoutError)
    assert 0.25 < took < 1.5, took


async def test_an_unreachable_postgres_fails_in_its_deadline_not_the_pools_ten_seconds() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test", timeout=0.5)
    try:
        error, took = await failure(lambda: store.claim("q:m", "a", 1000))
        assert error.store is store
        assert took < 1.5, took
        # and the next call is not held up behind the first one's failed connection
        _, again = await failure(lambda: store.complete("q:m", "a", 1000))
        assert again < 1.5, again
    finally:
        await store.close()


async def test_a_hung_postgres_fails_at_the_store_deadline(hung_port: int) -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{hung_port}/test", timeout="300ms")
    try:
        error, took = await failure(lambda: store.claim("q:m", "a", 1000))
    finally:
        await store.close()
    assert isinstance(error.cause, TimeoutError)
    assert took < 1.5, took


async def test_calls_to_an_unreachable_postgres_do_not_wait_for_each_other(
    hung_port: int,
) -> None:
    # Given 20 messages in hand whose store hangs, with a 0.5 s deadline
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{hung_port}/test", timeout=0.5)
    started = time.monotonic()
    try:
        results = await asyncio.gather(
            *(store.claim(f"q:m{n}", "a", 1000) for n in range(20)), return_exceptions=True
        )
        took = time.monotonic() - started
    finally:
        await store.close()
    # Then all of them have their answer after about one deadline, not one after the other
    assert all(isinstance(r, StoreUnavailableError) for r in results), results
    assert took < 1.5, took


async def test_a_slow_postgres_call_holds_up_no_other_call() -> None:
    # Given a row of the table locked by another transaction (a slow statement)
    require_postgres()
    import psycopg

    table = f"rf_test_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(POSTGRES_URL, table=table, timeout=0.5)
    await store.ping()  # creates the table
    blocker = await psycopg.AsyncConnection.connect(POSTGRES_URL)
    try:
        await blocker.execute(
            f"INSERT INTO {table} VALUES ('q:slow', 'x', false, now() + interval '1h')"
        )
        # When the locked key is claimed, and other keys at the same time
        slow = asyncio.ensure_future(store.claim("q:slow", "a", 1000))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        others = await asyncio.gather(*(store.claim(f"q:{n}", "a", 1000) for n in range(5)))
        # Then the others are answered at once, and the slow one fails at its deadline
        assert time.monotonic() - started < 0.4
        assert others == [CLAIMED] * 5
        with pytest.raises(StoreUnavailableError) as caught:
            await slow
        assert isinstance(caught.value.cause, TimeoutError)
    finally:
        await blocker.rollback()
        await blocker.close()
        await store.close()
        await drop_table(POSTGRES_URL, table)


async def test_a_store_deadline_is_a_positive_duration() -> None:
    require_redis()
    assert RedisStore(REDIS_URL, timeout="250ms").timeout == 0.25
    assert RedisStore(REDIS_URL, timeout=1.5).timeout == 1.5
    with pytest.raises(ValueError, match="timeout"):
        RedisStore(REDIS_URL, timeout="0s")
    with pytest.raises(ValueError, match="timeout"):
        PostgresStore(POSTGRES_URL, timeout=-1.0)


async def test_redis_answers_again_on_the_first_call_after_a_restart() -> None:
    # Given a store whose pooled connection the server has dropped (a restart)
    require_redis()
    prefix = f"rf-test:{uuid.uuid4().hex[:10]}:"
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        assert await store.claim("q:m1", "a", 30_000) == CLAIMED
        await store._client.connection_pool.disconnect()  # the socket is gone
        # Then the next call goes through on a fresh connection instead of failing
        assert await store.claim("q:m2", "a", 30_000) == CLAIMED
        # and a claim resent by the same owner (its first answer lost) still holds
        assert await store.claim("q:m2", "a", 30_000) == CLAIMED
        assert (await store.claim("q:m2", "b", 30_000)).state.value == "busy"
    finally:
        await store.close()
        await delete_prefix(REDIS_URL, prefix)


# -- a store of the user's own ---------------------------------------------------------------


class FlakyStore:
    """A user's store: fails (or hangs) on the first ``failures`` claims, records calls."""

    def __init__(self, failures: int = 0, hang: bool = False, timeout: float | None = None):
        self.ttl_ms = 60_000
        self.lease_ms = 30_000
        self.failures = failures
        self.hang = hang
        if timeout is not None:
            self.timeout = timeout
        self.keys: dict[str, str] = {}
        self.calls: list[tuple[str, str, str]] = []

    async def claim(self, key: str, owner: str, lease_ms: int) -> ClaimResult:
        self.calls.append(("claim", key, owner))
        if self.failures:
            self.failures -= 1
            if self.hang:
                await asyncio.Event().wait()
            raise ValueError("the user's database is down")
        self.keys[key] = owner
        return CLAIMED

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        self.calls.append(("complete", key, owner))
        self.keys[key] = "done"

    async def release(self, key: str, owner: str) -> None:
        self.calls.append(("release", key, owner))

    async def close(self) -> None:
        return None


async def invoke_guarded(guard: Guard) -> object:
    class Delivery:
        class header:
            class properties:
                message_id = "m-1"

    async def handler(_: object, __: int) -> str:
        return "done"

    return await guard.wrap(handler)(Delivery, 1)  # type: ignore[arg-type]


async def test_any_error_of_a_users_store_is_a_store_error_and_its_claim_is_released() -> None:
    # Given a user's store whose claim raises its own error
    store = FlakyStore(failures=1)
    guard = Guard("q", store)

    # Then the guard raises StoreUnavailableError naming that store
    with pytest.raises(StoreUnavailableError) as caught:
        await invoke_guarded(guard)
    assert caught.value.store is store
    assert isinstance(caught.value.cause, ValueError)

    # And once the store answers, the claim that may have been taken is released
    _, key, owner = store.calls[0]
    await guard.probe()
    assert ("release", key, owner) in store.calls
    assert await invoke_guarded(guard) == "done"


async def test_a_hung_users_store_is_cut_at_its_own_timeout() -> None:
    store = FlakyStore(failures=1, hang=True, timeout=0.2)
    error, took = await failure(lambda: invoke_guarded(Guard("q", store)))
    assert isinstance(error.cause, TimeoutError)
    assert took < 1.0


async def test_a_handled_message_is_marked_done_once_the_store_answers() -> None:
    # Given a store that fails when the handler has run (the done mark is lost)
    store = FlakyStore()
    guard = Guard("q", store)

    async def fail_complete(key: str, owner: str, ttl_ms: int) -> None:
        raise ConnectionError("gone")

    store.complete = fail_complete  # type: ignore[method-assign]
    with capture_logs() as logs:
        assert await invoke_guarded(guard) == "done"  # acked all the same
    assert any("marked once it answers" in entry["event"] for entry in logs)
    del store.complete  # the store answers again

    # When it is probed, the message is marked done
    await guard.probe()
    assert store.keys["q:m-1"] == "done"


# -- the fate of the message -----------------------------------------------------------------


def policy(toml: str, **options: object) -> OutcomePolicy:
    config = parse_topology(toml)
    return OutcomePolicy(config.queues["q"].retry, derive(config).routes["q"], **options)  # type: ignore[arg-type]


def store_error() -> StoreUnavailableError:
    return StoreUnavailableError(object(), "claim", ConnectionError("refused"))


@pytest.mark.parametrize(
    "options",
    [{}, {"retry_on": (ValueError,)}, {"dead_letter_on": (Exception,)}],
    ids=["default", "retry_on", "dead_letter_on"],
)
def test_a_store_failure_spends_no_attempt_even_on_the_last_one(options: object) -> None:
    plans = policy('[queues.q]\nretry = { delays = ["1s", "5s"] }\n', **options)  # type: ignore[arg-type]
    for attempt in (1, 3, 10):
        plan = plans.decide(store_error(), attempt)
        assert (plan.action, plan.attempt, plan.tier) == (Action.DEFER, attempt, "q.retry.1s")
    assert not plans.retries_now(store_error(), 1)


def test_a_store_failure_without_retries_still_waits() -> None:
    plan = policy("[queues.q]\nretry = false\n").decide(store_error(), 1)
    assert plan.action in (Action.DEFER, Action.REQUEUE)
    assert plan.attempt == 1


async def test_a_message_whose_store_fails_is_handled_once_it_answers_attempt_unspent() -> None:
    # Given an idempotent consumer with two attempts whose store fails the first 4 claims
    store = FlakyStore(failures=4)
    app = App(idempotency=store)
    attempts: list[int] = []

    @app.consumer("q", idempotent=True)
    async def handle(body: dict[str, int], message: Message) -> None:
        attempts.append(message.attempt)

    topology = parse_topology('[queues.q]\nretry = { delays = ["1s"], max_attempts = 2 }\n')
    async with TestApp(app, topology) as t:
        await t.publish("", "q", {"n": 1}, message_id="m-1")
        await t.drain()
        # Then it waited out the outage and ran once, as its first attempt; nothing in the DLQ
        assert attempts == [1]
        assert t.dead_letters("q") == []


# -- pausing the consumers that need it -------------------------------------------------------


async def test_an_outage_pauses_its_consumers_once_and_resumes_them_when_it_answers() -> None:
    # Given a dependency whose probe fails twice after the outage began
    answers = [ConnectionError("down"), ConnectionError("down"), None]

    async def probe() -> None:
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    up, outages = Value(), Value()
    dependency = Dependency("redis", probe, ("work",), gauge=up, outages=outages)
    events: list[str] = []

    async def pause() -> None:
        events.append("pause")

    async def resume() -> None:
        events.append("resume")

    dependency.attach(object(), pause, resume)

    with capture_logs() as logs:
        # When it fails (twice: two messages in hand met it)
        dependency.fail(store_error())
        dependency.fail(store_error())
        assert not dependency.up
        assert (up.value, outages.value) == (0, 1)
        await asyncio.wait_for(dependency._task, 10)  # type: ignore[arg-type]

    # Then the consumer paused once and resumed once, with one line each
    assert events == ["pause", "resume"]
    assert dependency.up
    assert up.value == 1
    lines = [(e["log_level"], e["event"]) for e in logs if e["log_level"] != "debug"]
    assert lines == [
        ("warning", "store unavailable; consuming paused until it answers"),
        ("info", "store answers again; consuming resumed"),
    ]
    resumed = logs[-1]
    assert resumed["queues"] == ["work"]
    assert resumed["probes"] == 3
    assert resumed["outage_s"] >= 0


# -- at start ----------------------------------------------------------------------------------


async def test_the_worker_checks_its_store_at_start_and_the_summary_says_so() -> None:
    from rabbitflow._summary import build
    from rabbitflow._worker import Worker, WorkerOptions

    # Given an idempotent consumer whose Redis is not there
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    app = App(idempotency=store)

    @app.consumer("billing", idempotent=True)
    async def bill(body: dict[str, int]) -> None:
        """A handler."""

    worker = Worker(app, parse_topology("[queues.billing]\n"), WorkerOptions(url="amqp://x/"))
    try:
        # When the worker checks its stores before consuming
        with capture_logs() as logs:
            await worker._check_stores()
        # Then one warning names it, it is down, and the summary shows it not answering
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "store unavailable; consuming paused until it answers"
        ]
        ((dependency, answered),) = worker.store_checks
        assert answered is None
        assert not dependency.up
        text = "\n".join(build(worker, "3.13.1").lines())
        assert f"store     {store!r} for billing: NOT ANSWERING" in text
        assert build(worker).fields()["stores"][0]["answer_ms"] is None
    finally:
        worker.consumers.close()
        await store.close()


async def test_a_store_that_answers_at_start_shows_its_time() -> None:
    from rabbitflow._summary import build
    from rabbitflow._worker import Worker, WorkerOptions

    require_redis()
    store = RedisStore(REDIS_URL, prefix=f"rf-test:{uuid.uuid4().hex[:10]}:")
    app = App(idempotency=store)

    @app.consumer("billing", idempotent=True)
    async def bill(body: dict[str, int]) -> None:
        """A handler."""

    worker = Worker(app, parse_topology("[queues.billing]\n"), WorkerOptions(url="amqp://x/"))
    try:
        await worker._check_stores()
        text = "\n".join(build(worker).lines())
        assert f"store     {store!r} for billing: answered in " in text
        assert all(dependency.up for dependency, _ in worker.store_checks)
    finally:
        worker.consumers.close()
        await store.close()
