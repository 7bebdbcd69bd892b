"""One delivery, top to bottom: deliver → decode → validate → (middleware, idempotency) →
handler → reply → plan → settle.

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

from rabbitflow import _clock as clock
from rabbitflow import _headers as h
from rabbitflow._backoff import full_jitter
from rabbitflow._breaker import CircuitBreaker, Dependencies
from rabbitflow._handler import Consumer, Signature
from rabbitflow._logging import DELIVERY, get_logger
from rabbitflow._outcome import ACK, EXPIRED, Action, OutcomePolicy, Plan, expired
from rabbitflow._payload import check_envelope
from rabbitflow._rpc import Replier
from rabbitflow._settle import Settler
from rabbitflow._span import Scope
from rabbitflow._telemetry import Telemetry
from rabbitflow._tracking import Tracker
from rabbitflow.errors import HandlerTimeout, StoreUnavailableError
from rabbitflow.idempotency._guard import SKIPPED, Guard, InProgress, Invoke
from rabbitflow.message import Message, read_attempt
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
        "_debug",
        "_deliver",
        "_dependencies",
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
    ) -> None:
        self._queue = spec.consumer.queue
        self._policy = spec.policy
        self._settler = settler
        self._losses = settler.losses
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
        props = delivery.header.properties
        attempt = read_attempt(props.headers) if props.headers else 1
        DELIVERY.set((self._queue, props.message_id, attempt))
        telemetry = self._telemetry
        telemetry.in_flight.value += 1
        started = time.perf_counter()
        span = telemetry.spans.open(delivery, attempt)
        plan: Plan | None = None
        try:
            plan = await self._plan(delivery, attempt, span)
            action = await self._settle(delivery, plan)
        finally:
            telemetry.in_flight.value -= 1
            telemetry.duration.observe(time.perf_counter() - started)
            span.close(plan)
        if self._tracker is not None:
            self._tracker.settled(delivery, plan, action)
        telemetry.outcomes[action].value += 1
        if self._debug:
            log.debug(
                "settled",
                outcome=action.value,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )

    async def _plan(self, delivery: DeliveredMessage, attempt: int, span: Scope) -> Plan:
        """Run the handler unless the message must wait or is due for the DLQ; the plan."""
        if self._losses.counts:
            parked = self._policy.after_connection_losses(self._losses.of(delivery), attempt)
            if parked is not None:
                return parked
        headers = delivery.header.properties.headers
        if headers and h.NOT_BEFORE in headers:
            not_before = h.read_epoch(headers[h.NOT_BEFORE])
            now = clock.now()
            if not_before is not None and not_before > now:
                return self._policy.defer(attempt, not_before, now)
        if self._settler.failing:
            failed = self._settler.failed_plan(delivery)
            if failed is not None:
                plan, attempt = self._policy.resume(failed, attempt)
                if plan is not None:
                    return plan
        breaker = self._breaker
        if breaker is not None and breaker.is_open:
            await breaker.wait_runnable()
        if expired(headers):
            # The last moment before the handler: its caller stopped waiting for the reply.
            return EXPIRED
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
            plan = self._policy.decide(exc, attempt)
            if self._immediate and self._policy.retries_now(exc, attempt):
                plan = await self._retry_now(delivery, attempt, plan)
                if plan is ACK:
                    self._record(False)
                    return ACK
                exc = plan.error or exc
            if isinstance(exc, StoreUnavailableError) and self._dependencies is not None:
                # rabbitflow's own store failed: every consumer that needs it pauses.
                self._dependencies.fail(exc)
            span.fail(exc)
            # A failure of the kind that is retried counts against the downstream even when
            # this message is not retried (attempts spent, retry = false); a Reject, a bad
            # payload or a dead_letter_on type is the message's fault, not the downstream's;
            # a duplicate waiting for its twin (InProgress) is nobody's.
            retryable = self._policy.action_for(exc) is Action.RETRY
            self._record(retryable and not isinstance(exc, InProgress))
            return plan
        self._record(False)
        await self._reply(delivery, result)
        return ACK

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
            await self._reply(delivery, result)
            return ACK
        return plan

    async def _reply(self, delivery: DeliveredMessage, result: Any) -> None:
        # The request's reply goes out before the request is acked.
        if (
            self._replier is not None
            and delivery.header.properties.reply_to
            and result is not SKIPPED
        ):
            await self._replier.reply(delivery, result)

    async def _settle(self, delivery: DeliveredMessage, plan: Plan) -> Action:
        action = await self._settler.settle(delivery, plan)
        # Failed for good, and its DLQ copy is confirmed: the caller of a request learns it
        # now instead of waiting for its timeout.
        if (
            action is not Action.ACK
            and action is plan.action
            and _final(plan)
            and plan.error is not None
            and delivery.header.properties.reply_to
        ):
            await self._reply_error(delivery, plan.error)
        return action

    async def _reply_error(self, delivery: DeliveredMessage, exc: BaseException) -> None:
        if self._replier is not None:
            await self._replier.reply_error(delivery, exc)

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


def _final(plan: Plan) -> bool:
    return plan.action is Action.DEAD_LETTER or plan.action is Action.DROP
