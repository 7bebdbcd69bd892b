"""One delivery, top to bottom: decode → (middleware, idempotency) → handler → reply → plan →
settle.

``Dispatcher.__call__`` is the per-message hot path: it builds nothing per message beyond what
the handler asks for (the :class:`Message` only when the handler takes one), reads no
configuration, and logs nothing on success.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor
from typing import Any

import structlog
from aiormq.abc import DeliveredMessage
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, set_span_in_context
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_random_exponential

from rabbitflow import _clock as clock
from rabbitflow import _headers as h
from rabbitflow._breaker import CircuitBreaker
from rabbitflow._handler import Consumer, Signature
from rabbitflow._logging import DELIVERY
from rabbitflow._outcome import ACK, Action, OutcomePolicy, Plan
from rabbitflow._payload import check_envelope
from rabbitflow._rpc import Replier
from rabbitflow._settle import Settler, parse_not_before
from rabbitflow._telemetry import Telemetry
from rabbitflow._tracing import Tracing, record_failure
from rabbitflow.errors import HandlerTimeout
from rabbitflow.idempotency._guard import SKIPPED, Guard, InProgress, Invoke
from rabbitflow.message import Message, read_attempt
from rabbitflow.middleware import CallNext, Middleware, build_stack

log = structlog.get_logger("rabbitflow.dispatch")


class Dispatcher:
    """Runs the handler of one queue for each delivery of one channel."""

    __slots__ = (
        "_breaker",
        "_call",
        "_debug",
        "_decode",
        "_executor",
        "_immediate",
        "_in_flight",
        "_invoke",
        "_is_async",
        "_limit",
        "_limiter",
        "_loop",
        "_message_only",
        "_policy",
        "_queue",
        "_replier",
        "_settler",
        "_span_name",
        "_span_static",
        "_telemetry",
        "_timeout",
        "_wants_message",
    )

    def __init__(
        self,
        consumer: Consumer,
        signature: Signature,
        policy: OutcomePolicy,
        settler: Settler,
        *,
        timeout_ms: int | None,
        max_body_size: int,
        max_in_flight: int,
        prefetch: int,
        executor: Executor,
        in_flight: set[asyncio.Task[Any]],
        immediate_retries: int = 0,
        breaker: CircuitBreaker | None = None,
        telemetry: Telemetry,
        middleware: Sequence[Middleware] = (),
        guard: Guard | None = None,
        replier: Replier | None = None,
    ) -> None:
        self._queue = consumer.queue
        self._call = consumer.func
        self._decode = signature.decode
        self._is_async = signature.is_async
        self._wants_message = signature.wants_message
        self._message_only = signature.message_only
        self._policy = policy
        self._settler = settler
        self._timeout = timeout_ms / 1000 if timeout_ms else None
        self._limit = max_body_size
        # The broker never has more than ``prefetch`` deliveries in hand on this channel, so
        # a semaphore is only needed when concurrency is set lower than prefetch.
        self._limiter = asyncio.Semaphore(max_in_flight) if max_in_flight < prefetch else None
        self._executor = executor
        self._in_flight = in_flight
        self._loop = asyncio.get_running_loop()
        self._immediate = immediate_retries
        self._breaker = breaker
        self._telemetry = telemetry
        self._span_name = f"process {consumer.queue}"
        self._span_static = Tracing.consume_attributes(consumer.queue)
        self._debug = _debug_enabled()
        self._replier = replier
        # The call chain is chosen once: the handler alone or under middleware, guarded or not.
        invoke: Invoke = self._direct
        if middleware:
            invoke = _through(build_stack(middleware, self._endpoint), self._queue)
        self._invoke = invoke if guard is None else guard.wrap(invoke)

    async def __call__(self, delivery: DeliveredMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            if self._limiter is None:
                await self._handle(delivery)
            else:
                async with self._limiter:
                    await self._handle(delivery)
        finally:
            self._in_flight.discard(task)

    async def _handle(self, delivery: DeliveredMessage) -> None:
        props = delivery.header.properties
        attempt = read_attempt(props.headers) if props.headers else 1
        DELIVERY.set((self._queue, props.message_id, attempt))
        telemetry = self._telemetry
        telemetry.in_flight.value += 1
        started = time.perf_counter()
        if telemetry.tracing is None:
            try:
                action = await self._settle(delivery, await self._plan(delivery, attempt))
            finally:
                telemetry.in_flight.value -= 1
                telemetry.duration.observe(time.perf_counter() - started)
        else:
            action = await self._traced(delivery, attempt, telemetry.tracing, started)
        telemetry.outcomes[action].value += 1
        if self._debug:
            log.debug(
                "settled",
                outcome=action.value,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )

    async def _traced(
        self, delivery: DeliveredMessage, attempt: int, tracing: Tracing, started: float
    ) -> Action:
        span = tracing.consume_span(
            self._span_name,
            delivery.header.properties.headers,
            self._span_attributes(delivery, attempt),
        )
        plan: Plan | None = None
        # The span is current while the handler runs and while the message is settled: the
        # handler's own spans, its log lines and the retry, deferral or dead-letter copy (whose
        # headers carry this trace on) all nest under it.
        token = otel_context.attach(set_span_in_context(span))
        try:
            plan = await self._plan(delivery, attempt, span)
            return await self._settle(delivery, plan)
        finally:
            otel_context.detach(token)
            self._telemetry.in_flight.value -= 1
            self._telemetry.duration.observe(time.perf_counter() - started)
            span.set_attribute("rabbitflow.outcome", plan.action.value if plan else "cancelled")
            if plan is not None and plan.action is not Action.ACK:
                span.set_attribute("rabbitflow.reason", plan.reason)
            span.end()

    def _span_attributes(self, delivery: DeliveredMessage, attempt: int) -> dict[str, Any]:
        props = delivery.header.properties
        return {
            **self._span_static,
            "messaging.destination.name": delivery.exchange or "amq.default",
            "messaging.rabbitmq.destination.routing_key": delivery.routing_key or "",
            "messaging.message.id": props.message_id or "",
            "messaging.message.conversation_id": props.correlation_id or "",
            "messaging.message.body.size": len(delivery.body),
            "rabbitflow.attempt": attempt,
        }

    async def _plan(
        self, delivery: DeliveredMessage, attempt: int, span: Span | None = None
    ) -> Plan:
        """Run the handler unless the message must wait or is due for the DLQ; the plan."""
        headers = delivery.header.properties.headers
        if headers and h.NOT_BEFORE in headers:
            not_before = parse_not_before(headers[h.NOT_BEFORE])
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
            if span is not None:
                record_failure(span, exc)
            # A failure of the kind that is retried counts against the downstream even when
            # this message is not retried (attempts spent, retry = false); a Reject, a bad
            # payload or a dead_letter_on type is the message's fault, not the downstream's;
            # a duplicate waiting for its twin (InProgress) is nobody's.
            retryable = self._policy.action_for(exc) is Action.RETRY
            self._record(retryable and not isinstance(exc, InProgress))
            return plan
        self._record(False)
        if delivery.header.properties.reply_to and result is not SKIPPED:
            await self._reply(delivery, result)
        return ACK

    async def _reply(self, delivery: DeliveredMessage, result: Any) -> None:
        # The request's reply goes out before the request is acked.
        if self._replier is not None:
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

    def _direct(self, delivery: DeliveredMessage, attempt: int) -> Awaitable[Any]:
        return self._run(self._arguments(delivery, attempt))

    def _endpoint(self, message: Message) -> Awaitable[Any]:
        # The innermost link of a middleware chain: decode, then the handler.
        if self._message_only:
            return self._run((message,))
        value = self._decode(self._queue, message.body, message.content_type)
        return self._run((value, message) if self._wants_message else (value,))

    def _arguments(self, delivery: DeliveredMessage, attempt: int) -> tuple[Any, ...]:
        if self._message_only:
            return (Message(delivery, self._queue, attempt),)
        value = self._decode(self._queue, delivery.body, delivery.header.properties.content_type)
        if self._wants_message:
            return (value, Message(delivery, self._queue, attempt))
        return (value,)

    async def _retry_now(self, delivery: DeliveredMessage, attempt: int, plan: Plan) -> Plan:
        """In-process retries after ``attempt`` failed (``plan``), with short exponential
        backoff and jitter; each is an attempt. ``ACK`` when one succeeds, else the plan for
        the last failure."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._immediate),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            reraise=False,
        )
        try:
            async for trial in retrying:
                with trial:
                    attempt += 1
                    try:
                        result = await self._invoke(delivery, attempt)
                    except asyncio.CancelledError:
                        raise
                    except BaseException as error:
                        plan = self._policy.decide(error, attempt)
                        if not self._policy.retries_now(error, attempt):
                            return plan
                        raise
                    if delivery.header.properties.reply_to and result is not SKIPPED:
                        await self._reply(delivery, result)
                    return ACK
        except RetryError:
            pass
        return plan

    async def _run(self, args: tuple[Any, ...]) -> Any:
        if self._timeout is None:
            if self._is_async:
                return await self._call(*args)
            return await self._in_thread(args)
        try:
            async with asyncio.timeout(self._timeout) as scope:
                if self._is_async:
                    return await self._call(*args)
                return await self._in_thread(args)
        except TimeoutError:
            if scope.expired():
                raise HandlerTimeout(self._queue, self._timeout) from None
            raise

    def _in_thread(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        # Sync handlers run in threads so that the event loop keeps answering heartbeats.
        context = contextvars.copy_context()
        return self._loop.run_in_executor(
            self._executor, functools.partial(context.run, self._call, *args)
        )


def _debug_enabled() -> bool:
    # Chosen once per consumer: with DEBUG off the hot path pays one attribute test. Before
    # logging is configured (a library user, TestApp) rabbitflow prints nothing per message.
    if not structlog.is_configured():
        return False
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return bool(is_enabled_for(logging.DEBUG)) if callable(is_enabled_for) else True


def _through(stack: CallNext, queue: str) -> Invoke:
    def invoke(delivery: DeliveredMessage, attempt: int) -> Awaitable[Any]:
        return stack(Message(delivery, queue, attempt))

    return invoke


def _final(plan: Plan) -> bool:
    return plan.action is Action.DEAD_LETTER or plan.action is Action.DROP
