"""The only code that acks, republishes to a retry tier, or dead-letters a delivery.

Every path acks the original delivery only after the work is done: after the handler returned,
or after the broker confirmed the retry or dead-letter copy. When a copy cannot be confirmed the
original is returned to its queue instead (at-least-once: never lost, possibly redelivered).
What to do is decided by :class:`rabbitflow._outcome.OutcomePolicy`; this module carries it out.
"""

from __future__ import annotations

import asyncio
import traceback
from collections import OrderedDict
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiormq.abc import AbstractChannel, DeliveredMessage

from rabbitflow import _clock as clock
from rabbitflow import _envelope as envelope
from rabbitflow import _headers as h
from rabbitflow._border import NACKED
from rabbitflow._broker_version import Returns
from rabbitflow._duration import format_duration
from rabbitflow._logging import get_logger
from rabbitflow._metrics import Metrics
from rabbitflow._outcome import Action, OutcomePolicy, Plan
from rabbitflow._publisher import Publisher, copy_properties
from rabbitflow._tracing import get_tracing
from rabbitflow.errors import FrameTooLarge, PublishError

if TYPE_CHECKING:
    from rabbitflow._repair import Repairer

log = get_logger("rabbitflow.settle")

# Messages whose copy failed to publish that a settler remembers (see Settler._failed).
FAILED_MEMORY = 10_000
# Messages in hand at a connection loss that a queue remembers (see Losses).
LOSS_MEMORY = 10_000
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

    ``returns`` is what a return costs a delivery of this queue (see
    :class:`rabbitflow._broker_version.Returns`). On a quorum queue of RabbitMQ 4.3+ (a nack
    is free), :meth:`close` gives the deliveries still in hand back with one nack instead of
    leaving them to the channel's close, which 4.3 counts as a failed delivery.
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
        "returns",
    )

    def __init__(
        self, channel: AbstractChannel, prefetch: int = 1, *, returns: Returns = Returns.FREE
    ) -> None:
        self._channel = channel
        self.returns = returns
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

    @property
    def lost(self) -> bool:
        """Whether the channel is closed: its deliveries are back in their queue."""
        return bool(self._channel.is_closed)

    async def nack(self, tag: int, *, requeue: bool = True) -> None:
        """Return a delivery to its queue now (sent at once, not batched): ``basic.nack``,
        which RabbitMQ 4.3 does not count toward the delivery limit (``basic.reject`` and a
        lost channel do), and every earlier version does."""
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
        """Send every pending ack, give back what is still in hand, then stop the flusher.

        The deliveries still unsettled here are those of handlers cut short by the shutdown
        timeout (and any that arrived after ``basic.cancel``): nothing failed, so where a nack
        is free (RabbitMQ 4.3+) one ``basic.nack(0, multiple, requeue)`` returns them all
        uncounted, at the head of a quorum queue as a closing channel would. Before 4.3
        every return counts, and the channel's close returns them."""
        await self.flush()
        if self.returns is Returns.NACK_FREE:
            try:
                await self._channel.basic_nack(0, multiple=True, requeue=True, wait=False)
            except Exception as exc:
                log.debug("give-back dropped on a closed channel", error=repr(exc))
        self._task.cancel()

    def abort(self) -> None:
        """Stop without sending: the channel is gone, and its delivery tags with it."""
        self._task.cancel()


class Losses:
    """The messages of one queue that were in hand when connections were lost.

    A delivery in hand when its connection goes is returned to the queue by the broker and
    runs again: at-least-once. A message that takes the connection down with it, again and
    again, would run for ever on a classic queue (no delivery count) and, until its quorum
    delivery limit, take every other delivery in hand with it each time. So each message
    (keyed by :func:`_identity`) counts the losses it was in hand for, in a row: settling it
    forgets the count, and the policy parks it once the count reaches ``crash_limit``
    (:meth:`OutcomePolicy.after_connection_losses`). In memory, bounded, for the life of the
    process (across its reconnections); empty, and free, while no connection was lost."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: OrderedDict[object, int] = OrderedDict()

    def lost(self, delivery: DeliveredMessage) -> None:
        """``delivery`` was in hand when its connection was lost."""
        key = _identity(delivery)
        self.counts[key] = self.counts.pop(key, 0) + 1
        while len(self.counts) > LOSS_MEMORY:
            self.counts.popitem(last=False)

    def of(self, delivery: DeliveredMessage) -> int:
        """Connection losses in a row while the message of ``delivery`` was in hand."""
        return self.counts.get(_identity(delivery), 0)

    def forget(self, delivery: DeliveredMessage) -> None:
        """The message of ``delivery`` is settled: its losses no longer count."""
        self.counts.pop(_identity(delivery), None)


def _now() -> str:
    return clock.utcnow().isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_in(delay_ms: int) -> str:
    # When a copy leaves its tier: what `rabbitflow retries list` shows as due.
    due = datetime.fromtimestamp(clock.now() + delay_ms / 1000, UTC)
    return due.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_bounded = h.keep_head


class Settler:
    """Carries out the :class:`Plan` of each delivery of one consumer; decides nothing.

    The only branch on what to do is the ``match`` in :meth:`settle`. A copy that cannot be
    published goes back to the policy, whose answer (a ``REQUEUE``) is carried out in turn.
    """

    __slots__ = (
        "_failed",
        "_publish_failures",
        "_refused",
        "acker",
        "losses",
        "metrics",
        "policy",
        "publisher",
        "queue",
        "repairer",
        "routes",
    )

    def __init__(
        self,
        policy: OutcomePolicy,
        acker: Acker,
        publisher: Publisher,
        metrics: Metrics | None = None,
        repairer: Repairer | None = None,
        losses: Losses | None = None,
    ) -> None:
        self.policy = policy
        self.queue = policy.queue
        self.routes = policy.routes
        self.acker = acker
        self.publisher = publisher
        self.metrics = metrics
        self.repairer = repairer
        # Messages whose copy could not be published, by identity: their last plan, how many
        # times in a row it failed, and the delivery tag in hand since when (loop time).
        # Bounded; empty in normal operation.
        self._failed: OrderedDict[object, tuple[Plan, int, int, float]] = OrderedDict()
        self._publish_failures = metrics.publish_failures if metrics is not None else None
        self.losses = losses if losses is not None else Losses()
        self._refused = False  # the last copy that failed was refused (basic.nack)

    @property
    def failing(self) -> bool:
        """Whether some message's copy failed to publish and has not been settled since."""
        return bool(self._failed)

    def failed_plan(self, delivery: DeliveredMessage) -> Plan | None:
        """The plan whose copy failed the last time ``delivery`` was in hand, if any."""
        entry = self._failed.get(_identity(delivery))
        return entry[0] if entry is not None else None

    async def settle(self, delivery: DeliveredMessage, plan: Plan) -> Action:
        """Carry out ``plan``; return the action that was taken."""
        match plan.action:
            case Action.ACK:
                self.acker.ack(delivery.delivery_tag or 0)
                if self._failed:
                    self._failed.pop(_identity(delivery), None)
                if self.losses.counts:
                    self.losses.forget(delivery)
                return Action.ACK
            case Action.RETRY:
                headers = self._failure_headers(delivery, plan, stack=False)
                headers[h.DUE_AT] = _iso_in(plan.delay_ms)
                return await self._copy(delivery, plan, "", plan.tier, headers)
            case Action.DEFER:
                headers = _deferred_headers(delivery)
                if plan.not_before is not None:
                    headers[h.NOT_BEFORE] = plan.not_before
                headers[h.DUE_AT] = _iso_in(plan.delay_ms)
                return await self._copy(delivery, plan, "", plan.tier, headers)
            case Action.DEAD_LETTER:
                headers = self._failure_headers(delivery, plan, stack=True)
                dlx = self.routes.dead_letter_exchange or ""
                return await self._copy(delivery, plan, dlx, self.queue, headers)
            case Action.DROP:
                self._done(delivery, plan)
                return Action.DROP
            case Action.EXPIRED:
                self._done(delivery, plan)
                return Action.EXPIRED
            case Action.REQUEUE:
                # The delivery stays in hand during the backoff: a missing target does not
                # turn into a hot redelivery loop, and a crash now returns it all the same.
                # basic.nack: RabbitMQ 4.3+ does not count it toward the delivery limit;
                # earlier versions do, so there the policy asks for this only past the hold
                # limit (see OutcomePolicy.after_publish_failure).
                await asyncio.sleep(plan.after)
                try:
                    await self.acker.nack(delivery.delivery_tag or 0, requeue=True)
                except Exception as exc:
                    log.debug("nack dropped on a closed channel", error=repr(exc))
                return Action.REQUEUE
        raise AssertionError(plan.action)  # pragma: no cover

    async def _copy(
        self,
        delivery: DeliveredMessage,
        plan: Plan,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
    ) -> Action:
        """Publish ``plan``'s copy, then ack the original; on failure, ask the policy."""
        if plan.after:
            # A copy that failed before, published again with the delivery still in hand,
            # unless its channel closed meanwhile: the broker has taken it back then.
            await asyncio.sleep(plan.after)
            if self.acker.lost:
                return Action.REQUEUE
            if self._refused:
                # RabbitMQ 3.10 refuses every later publish to that queue on the channel
                # that was refused, even once the queue takes messages again.
                await self.publisher.renew()
        error = await self._republish(delivery, plan, exchange, routing_key, headers)
        if isinstance(error, FrameTooLarge):
            instead = self.policy.after_frame_too_large(plan, error)
            if instead is not None:
                self._log_too_large(delivery, plan, instead, error)
                return await self.settle(delivery, instead)
        repairer = self.repairer
        if (
            error is not None
            and error.missing
            and repairer is not None
            and await repairer.repair(self.queue, exchange, routing_key, error)
        ):
            error = await self._republish(delivery, plan, exchange, routing_key, headers)
        if error is None:
            self._done(delivery, plan)
            return plan.action
        key = _identity(delivery)
        tag = delivery.delivery_tag or 0
        now = asyncio.get_running_loop().time()
        _, failures, held_tag, since = self._failed.pop(key, (plan, 0, 0, now))
        if held_tag != tag:
            since = now  # a new delivery of the message: its own time in hand starts now
        self._failed[key] = (replace(plan, after=0.0), failures + 1, tag, since)
        while len(self._failed) > FAILED_MEMORY:
            self._failed.popitem(last=False)
        held = now - since if self.acker.returns is Returns.COUNTED else None
        fallback = self.policy.after_publish_failure(plan, failures + 1, held)
        self._refused = error.reason == NACKED
        log.error(
            "could not publish the copy; the message goes back to its queue"
            if fallback.action is Action.REQUEUE
            else "could not publish the copy; the message stays in hand, published again",
            queue=self.queue,
            message_id=delivery.header.properties.message_id,
            planned=plan.action.value,
            target=routing_key if not exchange else f"{exchange}/{routing_key}",
            failures=failures + 1,
            retry_in=fallback.after,
            error=error.reason,
        )
        if self._publish_failures is not None:
            self._publish_failures.labels(self.queue, plan.action.value).inc()
        return await self.settle(delivery, fallback)

    def _done(self, delivery: DeliveredMessage, plan: Plan) -> None:
        """The plan's copy is confirmed (or none was needed): ack, forget, log, count."""
        self.acker.ack(delivery.delivery_tag or 0)
        if self._failed:
            self._failed.pop(_identity(delivery), None)
        if self.losses.counts:
            self.losses.forget(delivery)
        self._log(delivery, plan)
        metrics = self.metrics
        if metrics is None:
            return
        if plan.action is Action.RETRY:
            metrics.retries.labels(self.queue, format_duration(plan.delay_ms)).inc()
        elif plan.action is Action.DEAD_LETTER or plan.action is Action.DROP:
            metrics.dead_lettered.labels(self.queue, h.error_type(plan.error)).inc()

    def _log(self, delivery: DeliveredMessage, plan: Plan) -> None:
        props = delivery.header.properties
        match plan.action:
            case Action.ACK:
                log.debug(
                    "handled", queue=self.queue, message_id=props.message_id, attempt=plan.attempt
                )
            case Action.RETRY:
                log.warning(
                    "retry scheduled",
                    queue=self.queue,
                    attempt=plan.attempt - 1,
                    next_attempt=plan.attempt,
                    delay=format_duration(plan.delay_ms),
                    not_before=plan.not_before,
                    message_id=props.message_id,
                    error=h.error_type(plan.error),
                    reason=_bounded(str(plan.error), 200),
                )
            case Action.DEFER:
                log.debug(
                    "deferred: not before its time",
                    queue=self.queue,
                    message_id=props.message_id,
                    tier=plan.tier,
                    not_before=_text((props.headers or {}).get(h.NOT_BEFORE)),
                )
            case Action.DEAD_LETTER:
                log.error(
                    "message dead-lettered",
                    queue=self.queue,
                    message_id=props.message_id,
                    attempt=plan.attempt,
                    error=h.error_type(plan.error),
                    reason=plan.reason,
                    detail=_bounded(str(plan.error), 200),
                )
            case Action.EXPIRED:
                log.warning(
                    "request expired before it ran: its caller gave up waiting",
                    queue=self.queue,
                    message_id=props.message_id,
                    deadline=_text((props.headers or {}).get(h.DEADLINE)),
                )
            case Action.DROP:
                log.error(
                    "message dropped: the queue has dead_letter = false",
                    queue=self.queue,
                    message_id=props.message_id,
                    attempt=plan.attempt,
                    error=h.error_type(plan.error),
                    reason=plan.reason,
                )

    def _failure_headers(
        self, delivery: DeliveredMessage, plan: Plan, *, stack: bool
    ) -> dict[str, Any]:
        old = delivery.header.properties.headers or {}
        headers = h.carried_headers(old)
        if h.ATTEMPT in old:
            headers.setdefault(h.ORIGIN_QUEUE, self.queue)
            headers.setdefault(h.ORIGIN_EXCHANGE, delivery.exchange or "")
            headers.setdefault(h.ORIGIN_ROUTING_KEY, delivery.routing_key or "")
            headers.setdefault(h.FIRST_FAILED_AT, _now())
        else:
            # A first failure: these headers are rabbitflow's, whatever a publisher put there.
            headers[h.ORIGIN_QUEUE] = self.queue
            headers[h.ORIGIN_EXCHANGE] = delivery.exchange or ""
            headers[h.ORIGIN_ROUTING_KEY] = delivery.routing_key or ""
            headers[h.FIRST_FAILED_AT] = _now()
            headers.pop(h.REPLAY_COUNT, None)
        headers[h.ATTEMPT] = plan.attempt
        exc = plan.error
        headers[h.ERROR_TYPE] = h.error_type(exc)
        headers[h.ERROR_MESSAGE] = _bounded(str(exc), h.ERROR_MESSAGE_LIMIT)
        if plan.not_before is not None:
            headers[h.NOT_BEFORE] = plan.not_before
        if stack:
            headers[h.DEAD_LETTER_REASON] = plan.reason
            if exc is not None:
                headers[h.ERROR_STACK] = _stack(exc)
        return headers

    async def _republish(
        self,
        delivery: DeliveredMessage,
        plan: Plan,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
    ) -> PublishError | None:
        """Publish the copy and wait for its confirm; the error when it was not confirmed.

        The copy is fitted to the connection's frame_max first (its error stack, then its
        error message cut as needed): a frame too large would take the whole connection down
        (FrameTooLarge is returned instead, before anything is sent)."""
        props = delivery.header.properties
        body = delivery.body
        if plan.envelope:
            headers = dict(headers)  # the caller's stay whole for a second publish
            properties = copy_properties(props, headers)
            body = envelope.wrap(properties, body)
        else:
            properties = copy_properties(props, headers, expiration=plan.expiration_ms or None)
        try:
            with get_tracing().publish_span(exchange, routing_key, headers, props.message_id):
                trimmed = await self.publisher.send_fitted(
                    exchange, routing_key, body, properties, h.TRIMMABLE
                )
        except PublishError as exc:
            return exc
        if trimmed:
            log.warning(
                "error details of the copy cut to fit the connection's frame_max",
                queue=self.queue,
                message_id=props.message_id,
                planned=plan.action.value,
                frame_max=self.publisher.frame_max,
                bytes_cut=trimmed,
            )
        return None

    def _log_too_large(
        self, delivery: DeliveredMessage, plan: Plan, instead: Plan, error: FrameTooLarge
    ) -> None:
        log.error(
            "the message's own headers leave no room for rabbitflow's in a frame",
            queue=self.queue,
            message_id=delivery.header.properties.message_id,
            planned=plan.action.value,
            instead=instead.action.value,
            frame=error.size,
            frame_max=error.frame_max,
        )


def _identity(delivery: DeliveredMessage) -> object:
    # Redeliveries carry the same message_id and body; the tag changes with every delivery.
    message_id = delivery.header.properties.message_id
    return message_id if message_id else hash((delivery.routing_key, delivery.body))


def _deferred_headers(delivery: DeliveredMessage) -> dict[str, Any]:
    headers = delivery.header.properties.headers or {}
    return {k: v for k, v in headers.items() if not k.startswith(h.BROKER_HEADERS_PREFIX)}


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _stack(exc: BaseException) -> str:
    """The traceback, bounded: each chunk (a frame, an exception line) to the error-message
    limit, so that a huge exception message cannot push the frames out; then the whole to
    the stack limit, keeping the end, where the failure is."""
    chunks = traceback.TracebackException.from_exception(exc).format()
    text = "".join(_bounded_chunk(chunk) for chunk in chunks)
    return h.keep_tail(text, h.ERROR_STACK_LIMIT)


def _bounded_chunk(chunk: str) -> str:
    bounded = _bounded(chunk, h.ERROR_MESSAGE_LIMIT)
    return bounded if bounded is chunk or not chunk.endswith("\n") else bounded + "\n"
