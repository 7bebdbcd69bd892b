"""The only code that acks, republishes to a retry tier, or dead-letters a delivery.

Every path acks the original delivery only after the work is done: after the handler returned,
or after the broker confirmed the retry or dead-letter copy. When a copy cannot be confirmed the
original is returned to its queue instead (at-least-once: never lost, possibly redelivered).
What to do is decided by :class:`rabbitflow._outcome.OutcomePolicy`; this module carries it out.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aiormq.abc import AbstractChannel, DeliveredMessage

from rabbitflow import _envelope as envelope
from rabbitflow import _headers as h
from rabbitflow._border import NACKED
from rabbitflow._broker_version import Returns
from rabbitflow._logging import get_logger
from rabbitflow._metrics import Metrics
from rabbitflow._outcome import RETURNED, OutcomePolicy, Plan
from rabbitflow._publisher import Publisher, copy_properties
from rabbitflow._tracing import get_tracing
from rabbitflow.errors import FrameTooLarge, PublishError

if TYPE_CHECKING:
    from rabbitflow._repair import Repairer

log = get_logger("rabbitflow.settle")

# Messages whose copy failed to publish that a settler remembers (see FailedCopies).
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


class FailedCopies:
    """The messages of one channel whose copy could not be published, by identity (see
    :func:`_identity`): the plan whose copy failed, how many times in a row, and the delivery
    tag in hand since when (loop time).

    The settler records each failure and forgets a message once it is settled; the policy
    reads the failed plan when the message comes back (:meth:`OutcomePolicy.attempt`,
    :meth:`OutcomePolicy.before_run`). Bounded; empty, and free, in normal operation."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: OrderedDict[object, tuple[Plan, int, int, float]] = OrderedDict()

    def plan(self, delivery: DeliveredMessage) -> Plan | None:
        """The plan whose copy failed the last time ``delivery``'s message was in hand."""
        entry = self.entries.get(_identity(delivery))
        return entry[0] if entry is not None else None

    def record(self, delivery: DeliveredMessage, plan: Plan, now: float) -> tuple[int, float]:
        """``plan``'s copy failed once more: the failures in a row and since when (loop
        time) this delivery has been in hand with its copy failing."""
        key = _identity(delivery)
        tag = delivery.delivery_tag or 0
        _, failures, held_tag, since = self.entries.pop(key, (plan, 0, 0, now))
        if held_tag != tag:
            since = now  # a new delivery of the message: its own time in hand starts now
        self.entries[key] = (replace(plan, after=0.0), failures + 1, tag, since)
        while len(self.entries) > FAILED_MEMORY:
            self.entries.popitem(last=False)
        return failures + 1, since

    def forget(self, delivery: DeliveredMessage) -> None:
        self.entries.pop(_identity(delivery), None)


class Settler:
    """Carries out the :class:`Plan` of each delivery of one consumer; decides nothing.

    A plan with a copy is published to the plan's target with the plan's headers, then the
    original is acked; a ``requeue`` plan is nacked after its backoff; any other is acked.
    What is logged and counted is the plan's. A copy that cannot be published goes back to
    the policy, whose answer is carried out in turn."""

    __slots__ = (
        "_publish_failures",
        "_refused",
        "acker",
        "failed",
        "losses",
        "metrics",
        "policy",
        "publisher",
        "queue",
        "repairer",
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
        self.acker = acker
        self.publisher = publisher
        self.metrics = metrics
        self.repairer = repairer
        self.failed = FailedCopies()
        self._publish_failures = metrics.publish_failures if metrics is not None else None
        self.losses = losses if losses is not None else Losses()
        self._refused = False  # the last copy that failed was refused (basic.nack)

    async def settle(self, delivery: DeliveredMessage, plan: Plan) -> Plan:
        """Carry out ``plan``; return the plan that was carried out (another one when its
        copy could not be published: the policy's answer)."""
        if plan.headers is not None:
            return await self._copy(delivery, plan, plan.headers(delivery, plan, self.queue))
        if plan.requeue:
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
            return plan
        self._done(delivery, plan)
        return plan

    async def _copy(self, delivery: DeliveredMessage, plan: Plan, headers: dict[str, Any]) -> Plan:
        """Publish ``plan``'s copy, then ack the original; on failure, ask the policy."""
        if plan.after:
            # A copy that failed before, published again with the delivery still in hand,
            # unless its channel closed meanwhile: the broker has taken it back then.
            await asyncio.sleep(plan.after)
            if self.acker.lost:
                return RETURNED
            if self._refused:
                # RabbitMQ 3.10 refuses every later publish to that queue on the channel
                # that was refused, even once the queue takes messages again.
                await self.publisher.renew()
        error = await self._republish(delivery, plan, headers)
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
            and await repairer.repair(self.queue, plan.exchange, plan.routing_key, error)
        ):
            # The mechanism of a copy whose target is missing: declare it, publish again.
            error = await self._republish(delivery, plan, headers)
        if error is None:
            self._done(delivery, plan)
            return plan
        now = asyncio.get_running_loop().time()
        failures, since = self.failed.record(delivery, plan, now)
        held = now - since if self.acker.returns is Returns.COUNTED else None
        fallback = self.policy.after_publish_failure(plan, failures, held)
        self._refused = error.reason == NACKED
        log.error(
            "could not publish the copy; the message goes back to its queue"
            if fallback.requeue
            else "could not publish the copy; the message stays in hand, published again",
            queue=self.queue,
            message_id=delivery.header.properties.message_id,
            planned=plan.action.value,
            target=plan.routing_key if not plan.exchange else f"{plan.exchange}/{plan.routing_key}",
            failures=failures,
            retry_in=fallback.after,
            error=error.reason,
        )
        if self._publish_failures is not None:
            self._publish_failures.labels(self.queue, plan.action.value).inc()
        return await self.settle(delivery, fallback)

    def _done(self, delivery: DeliveredMessage, plan: Plan) -> None:
        """The plan's copy is confirmed (or none was needed): ack, forget, log, count."""
        self.acker.ack(delivery.delivery_tag or 0)
        if self.failed.entries:
            self.failed.forget(delivery)
        if self.losses.counts:
            self.losses.forget(delivery)
        note = plan.note
        if note is not None:
            message_id = delivery.header.properties.message_id
            getattr(log, note.method)(
                note.event, queue=self.queue, message_id=message_id, **note.fields
            )
        count = plan.count
        if count is not None and self.metrics is not None:
            getattr(self.metrics, count[0]).labels(self.queue, count[1]).inc()

    async def _republish(
        self, delivery: DeliveredMessage, plan: Plan, headers: dict[str, Any]
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
        exchange, routing_key = plan.exchange, plan.routing_key
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
