"""One delivery, top to bottom: deliver → before_run → decode → validate → (middleware,
idempotency) → handler → reply → decide → settle.

Every fate is the policy's (:mod:`rabbitflow._outcome`): ``before_run`` on arrival, ``decide``
after a failure, ``blame`` for the circuit breaker. Two places take the work of features that
run with a delivery: :meth:`Dispatcher._succeeded` (the handler returned, the delivery is not
settled yet: the reply of a request) and :meth:`Dispatcher._settle` (after the settler carried
the plan out: the error reply of a request that failed for good).

``Dispatcher.__call__`` is the per-message hot path: it builds nothing per message beyond what
the handler asks for (the :class:`Message` only when the handler takes one), reads no
configuration, and logs nothing on success. How the handler is called (async or in a thread,
under a timeout or not, through middleware or not) and how the delivery is traced are chosen
once, when the dispatcher is built.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import structlog
from aiormq.abc import DeliveredMessage

from rabbitflow._backoff import full_jitter
from rabbitflow._breaker import CircuitBreaker, Dependencies
from rabbitflow._continuation import Continuer, is_step
from rabbitflow._handler import Consumer, Signature
from rabbitflow._logging import DELIVERY, get_logger
from rabbitflow._outcome import ACK, Blame, OutcomePolicy, Plan, expired, settled_for_good
from rabbitflow._payload import check_envelope
from rabbitflow._rpc import Replier
from rabbitflow._settle import Settler
from rabbitflow._span import Scope
from rabbitflow._telemetry import Telemetry
from rabbitflow._tracking import Tracker
from rabbitflow.errors import HandlerTimeout, StoreUnavailableError
from rabbitflow.idempotency._guard import SKIPPED, Guard, Invoke
from rabbitflow.message import Message
from rabbitflow.middleware import Middleware, build_stack

log = get_logger("rabbitflow.dispatch")

Run = Callable[[tuple[Any, ...]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class DispatchSpec:
    """What a dispatcher knows about its queue: the handler, how to call it and the queue's
    options, gathered once at start-up."""

    consumer: Consumer
    signature: Signature
    policy: OutcomePolicy
    timeout_ms: int | None = None
    max_body_size: int = 0
    max_in_flight: int = 1
    prefetch: int = 1
    immediate_retries: int = 0
    middleware: Sequence[Middleware] = ()
    guard: Guard | None = None
    tracker: Tracker | None = None


class Dispatcher:
    """Runs the handler of one queue for each delivery of one channel."""

    __slots__ = (
        "_breaker",
        "_continuer",
        "_debug",
        "_deliver",
        "_dependencies",
        "_failed",
        "_immediate",
        "_in_flight",
        "_invoke",
        "_limit",
        "_limiter",
        "_losses",
        "_policy",
        "_queue",
        "_replier",
        "_settler",
        "_telemetry",
        "_tracker",
    )

    def __init__(
        self,
        spec: DispatchSpec,
        settler: Settler,
        telemetry: Telemetry,
        *,
        executor: Executor,
        in_flight: set[asyncio.Task[Any]],
        breaker: CircuitBreaker | None = None,
        replier: Replier | None = None,
        dependencies: Dependencies | None = None,
        continuer: Continuer | None = None,
    ) -> None:
        self._queue = spec.consumer.queue
        self._policy = spec.policy
        self._settler = settler
        self._losses = settler.losses
        self._failed = settler.failed
        self._telemetry = telemetry
        self._limit = spec.max_body_size
        # The broker never has more than ``prefetch`` deliveries in hand on this channel, so
        # a semaphore is only needed when concurrency is set lower than prefetch.
        limited = spec.max_in_flight < spec.prefetch
        self._limiter = asyncio.Semaphore(spec.max_in_flight) if limited else None
        self._deliver = self._limited if limited else self._handle
        self._in_flight = in_flight
        self._immediate = spec.immediate_retries
        self._breaker = breaker
        self._dependencies = dependencies
        self._replier = replier
        self._continuer = continuer
        self._tracker = spec.tracker
        self._debug = _debug_enabled()
        self._invoke = _invoker(spec, _runner(spec, asyncio.get_running_loop(), executor))

    async def __call__(self, delivery: DeliveredMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            await self._deliver(delivery)
        except asyncio.CancelledError:
            # The channel or its connection is lost (aiormq cancels the deliveries of a
            # closed channel, the worker those of a lost connection), or a shutdown ran out
            # of time: the broker returns the message to its queue, and it counts one loss.
            self._losses.lost(delivery)
            raise
        finally:
            self._in_flight.discard(task)

    async def _limited(self, delivery: DeliveredMessage) -> None:
        assert self._limiter is not None
        async with self._limiter:
            await self._handle(delivery)

    async def _handle(self, delivery: DeliveredMessage) -> None:
        attempt = self._policy.attempt(delivery, self._failed)
        DELIVERY.set((self._queue, delivery.header.properties.message_id, attempt))
        telemetry = self._telemetry
        telemetry.in_flight.value += 1
        started = time.perf_counter()
        span = telemetry.spans.open(delivery, attempt)
        plan: Plan | None = None
        try:
            plan = await self._plan(delivery, attempt, span)
            done = await self._settle(delivery, plan)
        finally:
            telemetry.in_flight.value -= 1
            telemetry.duration.observe(time.perf_counter() - started)
            span.close(plan)
        if self._tracker is not None:
            self._tracker.settled(delivery, plan, done.action)
        telemetry.outcomes[done.action].value += 1
        if self._debug:
            log.debug(
                "settled",
                outcome=done.action.value,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )

    async def _plan(self, delivery: DeliveredMessage, attempt: int, span: Scope) -> Plan:
        """before_run → decode/validate → handler → reply → decide: the plan to settle."""
        plan = self._policy.before_run(delivery, attempt, self._losses, self._failed)
        breaker = self._breaker
        if plan is None and breaker is not None and breaker.is_open:
            await breaker.wait_runnable()
            # Time passed while the consumer was paused: a request may have expired.
            plan = self._policy.before_run(delivery, attempt, self._losses, self._failed)
        if plan is not None:
            return plan
        try:
            check_envelope(
                self._queue, delivery.body, delivery.header.properties.content_encoding, self._limit
            )
            result = await self._invoke(delivery, attempt)
        except asyncio.CancelledError:
            # Shutdown or a lost connection: the delivery stays unacked and the broker
            # requeues it when the channel closes. Never reject it here.
            raise
        except BaseException as exc:
            return await self._failed_run(delivery, attempt, exc, span)
        self._record(False)
        return await self._succeeded(delivery, attempt, result)
        return ACK

    async def _failed_run(
        self, delivery: DeliveredMessage, attempt: int, exc: BaseException, span: Scope
    ) -> Plan:
        """The plan after the handler raised ``exc`` on ``attempt`` (in-process retries
        first, when the queue has them and the policy allows)."""
        policy = self._policy
        plan = policy.decide(exc, attempt)
        if self._immediate and policy.retries_now(exc, attempt):
            plan = await self._retry_now(delivery, attempt, plan)
            if plan is ACK:
                self._record(False)
                return ACK
            exc = plan.error or exc
        blame = policy.blame(exc)
        if blame is Blame.STORE and self._dependencies is not None:
            assert isinstance(exc, StoreUnavailableError)
            self._dependencies.fail(exc)
        span.fail(exc)
        self._record(blame is Blame.DOWNSTREAM)
        return plan

    async def _retry_now(self, delivery: DeliveredMessage, attempt: int, plan: Plan) -> Plan:
        """In-process retries after ``attempt`` failed (``plan``), each an attempt, the second
        and later after a short exponential backoff with full jitter. ``ACK`` when one
        succeeds, else the plan for the last failure."""
        headers = delivery.header.properties.headers
        for trial in range(self._immediate):
            if trial:
                await asyncio.sleep(full_jitter(trial, base=0.05, cap=1.0))
            if expired(headers):
                return plan  # a request: its retry copy is settled unrun when it comes back
            attempt += 1
            try:
                result = await self._invoke(delivery, attempt)
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                plan = self._policy.decide(error, attempt)
                if not self._policy.retries_now(error, attempt):
                    return plan
                continue
            return await self._succeeded(delivery, attempt, result)
            return ACK
        return plan

    async def _succeeded(self, delivery: DeliveredMessage, attempt: int, result: Any) -> Plan:
        """The handler returned ``result``; the delivery is not settled yet. The place for
        work that must be done before the ack (at-least-once): the reply of a request, the
        next step of a workflow (published and confirmed, or a chord member recorded). When
        that work fails, the run failed: the policy decides its fate."""
        if result is SKIPPED:
            return ACK
        if self._replier is not None and delivery.header.properties.reply_to:
            await self._replier.reply(delivery, result)
        if self._continuer is not None and is_step(delivery):
            try:
                await self._continuer.succeeded(delivery, result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return self._policy.decide(exc, attempt)
        return ACK

    async def _settle(self, delivery: DeliveredMessage, plan: Plan) -> Plan:
        """Settle ``plan``; the plan carried out. After it, the place for work that follows
        a settled delivery: what a delivery that failed for good tells its caller or its
        workflow."""
        done = await self._settler.settle(delivery, plan)
        if plan.final and settled_for_good(plan, done):
            await self._failed_for_good(delivery, plan)
        return done

    async def _failed_for_good(self, delivery: DeliveredMessage, plan: Plan) -> None:
        # Failed for good, and its DLQ copy is confirmed: the caller of a request learns it
        # now instead of waiting for its timeout.
        if self._replier is not None and delivery.header.properties.reply_to:
            assert plan.error is not None
            await self._replier.reply_error(delivery, plan.error)
        # A workflow step in the DLQ fails its workflow, naming the step.
        if self._continuer is not None and is_step(delivery):
            await self._continuer.dead_lettered(delivery, plan.error or RuntimeError(plan.reason))

    def _record(self, failed: bool) -> None:
        if self._breaker is not None:
            self._breaker.record(failed)


def _debug_enabled() -> bool:
    # Chosen once per consumer: with DEBUG off the hot path pays one attribute test. Before
    # logging is configured (a library user, TestApp) rabbitflow prints nothing per message.
    if not structlog.is_configured():
        return False
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return bool(is_enabled_for(logging.DEBUG)) if callable(is_enabled_for) else True


def _runner(spec: DispatchSpec, loop: asyncio.AbstractEventLoop, executor: Executor) -> Run:
    """How the handler is called with its arguments: awaited, or in a thread; under the
    queue's timeout or not."""
    call = spec.consumer.func
    queue = spec.consumer.queue

    def in_thread(args: tuple[Any, ...]) -> Awaitable[Any]:
        # Sync handlers run in threads so that the event loop keeps answering heartbeats.
        context = contextvars.copy_context()
        return loop.run_in_executor(executor, functools.partial(context.run, call, *args))

    def awaited(args: tuple[Any, ...]) -> Awaitable[Any]:
        return call(*args)  # type: ignore[no-any-return]

    run = awaited if spec.signature.is_async else in_thread
    if not spec.timeout_ms:
        return run
    timeout = spec.timeout_ms / 1000

    async def timed(args: tuple[Any, ...]) -> Any:
        try:
            async with asyncio.timeout(timeout) as scope:
                return await run(args)
        except TimeoutError:
            if scope.expired():
                raise HandlerTimeout(queue, timeout) from None
            raise

    return timed


def _invoker(spec: DispatchSpec, run: Run) -> Invoke:
    """The call chain for one delivery: the handler alone or under middleware, guarded by the
    idempotency store or not. The handler's arguments are decoded inside it."""
    queue = spec.consumer.queue
    decode = spec.signature.decode
    invoke: Invoke
    if spec.middleware:

        def endpoint(message: Message) -> Awaitable[Any]:
            # The innermost link of a middleware chain: decode, then the handler.
            if spec.signature.message_only:
                return run((message,))
            value = decode(queue, message.body, message.content_type)
            return run((value, message) if spec.signature.wants_message else (value,))

        stack = build_stack(spec.middleware, endpoint)

        def invoke(delivery: DeliveredMessage, attempt: int) -> Awaitable[Any]:
            return stack(Message(delivery, queue, attempt))

    elif spec.signature.message_only:

        def invoke(delivery: DeliveredMessage, attempt: int) -> Awaitable[Any]:
            return run((Message(delivery, queue, attempt),))

    elif spec.signature.wants_message:

        def invoke(delivery: DeliveredMessage, attempt: int) -> Awaitable[Any]:
            value = decode(queue, delivery.body, delivery.header.properties.content_type)
            return run((value, Message(delivery, queue, attempt)))

    else:

        def invoke(delivery: DeliveredMessage, attempt: int) -> Awaitable[Any]:
            props = delivery.header.properties
            return run((decode(queue, delivery.body, props.content_type),))

    if spec.guard is not None:
        invoke = spec.guard.wrap(invoke)
    # The tracker is outermost: a cancelled job is acked before the guard claims its key.
    return invoke if spec.tracker is None else spec.tracker.wrap(invoke)
