"""The only code that acks, republishes to a retry tier, or dead-letters a delivery.

Every path acks the original delivery only after the work is done: after the handler returned,
or after the broker confirmed the retry or dead-letter copy. When a copy cannot be confirmed the
original is returned to its queue instead (at-least-once: never lost, possibly redelivered).
"""

from __future__ import annotations

import asyncio
import traceback
from datetime import UTC, datetime
from typing import Any

import structlog
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from rabbitflow import clock
from rabbitflow import headers as h
from rabbitflow.duration import format_duration
from rabbitflow.errors import PublishError
from rabbitflow.metrics import Metrics
from rabbitflow.outcome import Action, Outcome
from rabbitflow.publisher import PERSISTENT, Publisher
from rabbitflow.topology.derived import QueueRoutes
from rabbitflow.tracing import get_tracing

log = structlog.get_logger("rabbitflow.settle")

# After a retry or dead-letter copy could not be published, wait before returning the original
# to the queue, so that a missing retry queue does not turn into a hot redelivery loop.
REPUBLISH_BACKOFF = 1.0
# Longest time a completed delivery waits for its ack to be sent (batched with others).
ACK_DELAY = 0.002


class Acker:
    """Acks completed deliveries of one channel in batches.

    Completed tags are flushed when a quarter of the prefetch window is done, or
    ``ACK_DELAY`` after the first of them, whichever comes first: the broker keeps sending
    while three quarters of the window are still free, and one frame acks many messages.
    When every tag up to a completed one is settled, one ``basic.ack(multiple=True)`` covers
    them all; completed tags above a gap (a slow message still in hand) are acked one by
    one, since ``multiple`` would ack the slow message too.
    """

    __slots__ = (
        "_batch",
        "_channel",
        "_done",
        "_event",
        "_loop",
        "_low",
        "_settled",
        "_task",
        "_timer",
    )

    def __init__(self, channel: AbstractChannel, prefetch: int = 1) -> None:
        self._channel = channel
        self._low = 1  # every tag below this one is settled
        self._settled: set[int] = set()  # settled tags >= _low (acks pending or nacked)
        self._done: list[int] = []  # tags whose ack has not been sent yet
        self._batch = max(1, prefetch // 4)
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._task = self._loop.create_task(self._flusher())

    def ack(self, tag: int) -> None:
        done = self._done
        done.append(tag)
        self._settled.add(tag)
        if len(done) >= self._batch:
            self._event.set()
        elif self._timer is None:
            self._timer = self._loop.call_later(ACK_DELAY, self._event.set)

    async def nack(self, tag: int, *, requeue: bool = True) -> None:
        """Return a delivery to its queue now (sent at once, not batched)."""
        self._settled.add(tag)
        await self._channel.basic_nack(tag, requeue=requeue, wait=False)

    async def _flusher(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await self.flush()

    async def flush(self) -> None:
        if not self._done:
            return
        done, self._done = self._done, []
        low, settled = self._low, self._settled
        while low in settled:
            settled.discard(low)
            low += 1
        self._low = low
        below = [tag for tag in done if tag < low]
        try:
            # RabbitMQ fails the channel if the tag of a multiple ack is not outstanding
            # itself, so the batch ends on the highest tag not acked yet.
            if below:
                await self._channel.basic_ack(max(below), multiple=True, wait=False)
            for tag in done:
                if tag >= low:
                    await self._channel.basic_ack(tag, wait=False)
        except Exception as exc:
            # The channel is gone: its unacked deliveries go back to the queue on the broker
            # side, so these tags are stale and will be redelivered.
            log.debug("acks dropped on a closed channel", count=len(done), error=repr(exc))

    async def close(self) -> None:
        """Send every pending ack, then stop the flusher."""
        await self.flush()
        self._task.cancel()


def _now() -> str:
    return clock.utcnow().isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bounded(text: str, limit: int) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


class Settler:
    """Settles the deliveries of one consumer."""

    __slots__ = ("acker", "metrics", "publisher", "queue", "routes")

    def __init__(
        self,
        queue: str,
        acker: Acker,
        publisher: Publisher,
        routes: QueueRoutes,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.acker = acker
        self.publisher = publisher
        self.routes = routes
        self.metrics = metrics

    async def fail(
        self, delivery: DeliveredMessage, exc: BaseException, outcome: Outcome, attempt: int
    ) -> Action:
        """Republish a failed delivery as ``outcome`` says, then ack it; return what was done."""
        tag = delivery.delivery_tag or 0
        if outcome.action is Action.RETRY and self.routes.tiers:
            delay, tier = self.routes.tier_at_least(outcome.delay_ms)
            headers = self._failure_headers(delivery, exc, attempt + 1, stack=False)
            if outcome.delay_ms > delay:
                headers[h.NOT_BEFORE] = _not_before(outcome.delay_ms)
            if await self._republish(delivery, "", tier, headers):
                log.warning(
                    "retry scheduled",
                    queue=self.queue,
                    attempt=attempt,
                    next_attempt=attempt + 1,
                    delay=format_duration(delay),
                    message_id=delivery.header.properties.message_id,
                    error=_error_type(exc),
                    reason=_bounded(str(exc), 200),
                )
                self.acker.ack(tag)
                if self.metrics is not None:
                    self.metrics.retries.labels(self.queue, format_duration(delay)).inc()
                return Action.RETRY
            return Action.REQUEUE
        return await self.dead_letter(delivery, exc, outcome.reason, attempt)

    async def dead_letter(
        self, delivery: DeliveredMessage, exc: BaseException, reason: str, attempt: int
    ) -> Action:
        dlx = self.routes.dead_letter_exchange
        message_id = delivery.header.properties.message_id
        if dlx is None:
            log.error(
                "message dropped: the queue has dead_letter = false",
                queue=self.queue,
                message_id=message_id,
                attempt=attempt,
                error=_error_type(exc),
                reason=reason,
            )
            self.acker.ack(delivery.delivery_tag or 0)
            if self.metrics is not None:
                self.metrics.dead_lettered.labels(self.queue, _error_type(exc)).inc()
            return Action.DEAD_LETTER
        headers = self._failure_headers(delivery, exc, attempt, stack=True)
        if await self._republish(delivery, dlx, self.queue, headers):
            log.error(
                "message dead-lettered",
                queue=self.queue,
                message_id=message_id,
                attempt=attempt,
                error=_error_type(exc),
                reason=reason,
                detail=_bounded(str(exc), 200),
            )
            self.acker.ack(delivery.delivery_tag or 0)
            if self.metrics is not None:
                self.metrics.dead_lettered.labels(self.queue, _error_type(exc)).inc()
            return Action.DEAD_LETTER
        return Action.REQUEUE

    async def defer(self, delivery: DeliveredMessage, not_before: float) -> None:
        """Park a message whose ``rabbitflow-not-before`` is still ahead, without running it."""
        remaining = max(int((not_before - clock.utcnow().timestamp()) * 1000), 0)
        # Hop through tiers that do not overshoot, so the message runs close to not-before.
        _, tier = self.routes.tier_at_most(remaining)
        headers = dict(delivery.header.properties.headers or {})
        headers = {k: v for k, v in headers.items() if not k.startswith(h.BROKER_HEADERS_PREFIX)}
        if await self._republish(delivery, "", tier, headers):
            self.acker.ack(delivery.delivery_tag or 0)

    def _failure_headers(
        self, delivery: DeliveredMessage, exc: BaseException, attempt: int, *, stack: bool
    ) -> dict[str, Any]:
        old = delivery.header.properties.headers or {}
        headers = h.carried_headers(old)
        headers[h.ATTEMPT] = attempt
        headers.setdefault(h.ORIGIN_QUEUE, self.queue)
        headers.setdefault(h.ORIGIN_EXCHANGE, delivery.exchange or "")
        headers.setdefault(h.ORIGIN_ROUTING_KEY, delivery.routing_key or "")
        headers.setdefault(h.FIRST_FAILED_AT, _now())
        headers[h.ERROR_TYPE] = _error_type(exc)
        headers[h.ERROR_MESSAGE] = _bounded(str(exc), h.ERROR_MESSAGE_LIMIT)
        if stack:
            headers[h.ERROR_STACK] = _stack(exc)
        return headers

    async def _republish(
        self, delivery: DeliveredMessage, exchange: str, routing_key: str, headers: dict[str, Any]
    ) -> bool:
        props = delivery.header.properties
        properties = spec.Basic.Properties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            headers=headers,
            delivery_mode=PERSISTENT,
            priority=props.priority,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            message_id=props.message_id,
            timestamp=props.timestamp,
            message_type=props.message_type,
            app_id=props.app_id,
        )
        try:
            with get_tracing().publish_span(exchange, routing_key, headers, props.message_id):
                await self.publisher.send(exchange, routing_key, delivery.body, properties)
            return True
        except PublishError as exc:
            log.error(
                "could not republish; the message goes back to its queue",
                queue=self.queue,
                message_id=props.message_id,
                target=routing_key,
                error=str(exc),
            )
        await asyncio.sleep(REPUBLISH_BACKOFF)
        try:
            await self.acker.nack(delivery.delivery_tag or 0, requeue=True)
        except Exception as exc:
            log.debug("nack dropped on a closed channel", error=repr(exc))
        return False


def _stack(exc: BaseException) -> str:
    """The traceback, bounded: each chunk (a frame, an exception line) to the error-message
    limit, so that a huge exception message cannot push the frames out; then the whole to
    the stack limit, keeping the end, where the failure is."""
    chunks = traceback.TracebackException.from_exception(exc).format()
    text = "".join(_bounded_chunk(chunk) for chunk in chunks)
    data = text.encode("utf-8", "replace")
    if len(data) > h.ERROR_STACK_LIMIT:
        text = "..." + data[-(h.ERROR_STACK_LIMIT - 3) :].decode("utf-8", "ignore")
    return text


def _bounded_chunk(chunk: str) -> str:
    bounded = _bounded(chunk, h.ERROR_MESSAGE_LIMIT)
    return bounded if bounded is chunk or not chunk.endswith("\n") else bounded + "\n"


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _not_before(delay_ms: int) -> str:
    return datetime.fromtimestamp(clock.utcnow().timestamp() + delay_ms / 1000, UTC).isoformat()


def parse_not_before(value: object) -> float | None:
    """Epoch seconds of a ``rabbitflow-not-before`` header; None when absent or malformed."""
    if not isinstance(value, str | bytes):
        return None
    try:
        text = value.decode() if isinstance(value, bytes) else value
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
