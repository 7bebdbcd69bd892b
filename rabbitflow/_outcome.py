"""The one place that decides what happens to a delivery: a complete :class:`Plan`.

The dispatcher asks the policy twice at most: :meth:`OutcomePolicy.before_run` on arrival
(a plan instead of running the handler, or None), :meth:`OutcomePolicy.decide` when the
handler failed (``ACK`` when it returned). The settler carries the plan out without deciding
anything: it publishes the plan's copy (target and headers are in the plan) and acks, or nacks
after the plan's backoff, and logs and counts what the plan says. When a plan's copy cannot be
published, the settler asks the policy again (:meth:`OutcomePolicy.after_publish_failure`,
:meth:`OutcomePolicy.after_frame_too_large`). Which failures count against the downstream
(the circuit breaker) is :meth:`OutcomePolicy.blame`.

| situation | plan |
|---|---|
| handler returned | ``ACK`` |
| retryable failure, attempts left, tiers | ``RETRY`` to the tier for the next attempt |
| ``Retry(delay)`` beyond the largest tier | ``RETRY`` with a not-before (the copy hops tiers) |
| ``Retry(delay)`` beyond ``max_defer`` | ``DEAD_LETTER`` (``not_before_out_of_range``) |
| not-before still ahead (a hop) | ``DEFER`` to the largest tier that does not overshoot |
| not-before nearer than every tier (the last hop) | ``DEFER``, smallest tier, TTL = the rest |
| a wait that spends no attempt (``InProgress``) | ``DEFER`` with a not-before |
| rabbitflow's own store failed (``StoreUnavailableError``) | ``DEFER``, attempt unspent |
| not-before beyond ``max_defer`` | ``DEAD_LETTER`` (``not_before_out_of_range``) |
| ``Reject``, bad payload, ``dead_letter_on``, attempts spent, retries off | ``DEAD_LETTER`` |
| any of those with ``dead_letter = false`` | ``DROP`` (logged at ERROR) |
| its copy could not be published | ``REQUEUE`` after an exponential backoff |
| the same, quorum queue before 4.3 | the plan again after the backoff, held; then ``REQUEUE`` |
| its copy does not fit in a frame without its error details | ``DEAD_LETTER``, ``envelope`` |
| a request past its ``rabbitflow-deadline`` (its caller gave up) | ``EXPIRED``, not run |
| in hand at ``crash_limit`` connection losses in a row | ``DEAD_LETTER`` (parked, not run) |
| back after its DLQ copy was not published | the same ``DEAD_LETTER``, not run |
| back after its retry copy was not published | run, as the attempt the copy carried |

``before_run`` answers the rows of a delivery that does not run (crash limit, not-before,
DLQ copy not published, deadline, in this order); ``decide`` the rows of a failed handler.

The table is built once per consumer; a failure walks its exception's MRO so that a subclass
follows its parent unless it has an entry of its own.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiormq.abc import DeliveredMessage

from rabbitflow import _clock as clock
from rabbitflow import _headers as h
from rabbitflow._duration import format_duration
from rabbitflow.errors import (
    CrashLimitReached,
    DecodeError,
    DeferralOutOfRange,
    FrameTooLarge,
    HandlerTimeout,
    Reject,
    Retry,
    StoreUnavailableError,
)
from rabbitflow.message import read_attempt
from rabbitflow.topology._derived import QueueRoutes
from rabbitflow.topology._model import RetryPolicy
from rabbitflow.types import ExceptionTypes

if TYPE_CHECKING:
    from rabbitflow._settle import FailedCopies, Losses

# A copy that could not be published is returned to the queue after this backoff, doubled
# for each consecutive failure of the same message, up to the cap.
REQUEUE_BACKOFF = 1.0
REQUEUE_BACKOFF_MAX = 60.0
# A message whose store failed waits this long at most in a tier (the smallest tier when
# none is shorter): the consumer is paused meanwhile, and the copy waits in the queue.
STORE_WAIT_MS = 1000
# Before RabbitMQ 4.3 every return of a delivery (nack, reject, a closed channel) counts toward
# a quorum queue's delivery limit, which exists to count crashes: so the original of a copy
# that could not be published is kept in hand and its copy tried again, for at most this
# long. Past the queue's consumer_timeout (RabbitMQ's default: 30 minutes) the broker would
# close the channel and count every delivery on it, hence a quarter of a queue's own
# consumer_timeout when that is shorter.
HOLD_LIMIT = 300.0


class Action(enum.Enum):
    """What the settler does with a delivery (also the ``outcome`` label of the metrics)."""

    ACK = "ack"
    RETRY = "retry"
    DEFER = "deferred"
    DEAD_LETTER = "dead_letter"
    DROP = "dropped"
    REQUEUE = "requeued"
    EXPIRED = "expired"


class Blame(enum.Enum):
    """Whose failure a handler's exception is (see :meth:`OutcomePolicy.blame`)."""

    NOBODY = "nobody"  # the message's own fault, or a wait that spends no attempt
    DOWNSTREAM = "downstream"  # counts against the consumer's circuit breaker
    STORE = "store"  # rabbitflow's own store: every consumer that needs it pauses


@dataclass(frozen=True, slots=True)
class Note:
    """The line the settler logs once a plan is carried out: the logger's method, the event
    and its fields (the queue and message id are added by the settler)."""

    method: str
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


# Writes the headers of a plan's copy from the delivery, the plan and the consumer's queue.
HeaderWriter = Callable[[DeliveredMessage, "Plan", str], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the settler needs to settle one delivery; it decides nothing further.

    ``attempt`` is the attempt written on the copy (the next one for a retry); ``tier`` and
    ``delay_ms`` name the retry tier of a ``RETRY`` or ``DEFER``; ``not_before`` is the ISO
    time the copy must not run before; ``after`` is the backoff of a ``REQUEUE``, or the wait
    before a copy is published again with its delivery held (0 on a first try);
    ``envelope`` moves the message's own headers into the body of its ``DEAD_LETTER`` copy
    (see :mod:`rabbitflow._envelope`); ``expiration_ms`` is the per-message TTL of a
    ``DEFER`` copy whose wait is shorter than its tier (the last hop of a not-before).

    What the settler does: with ``headers`` (a :data:`HeaderWriter`), publish a copy to
    ``exchange``/``routing_key`` and ack once it is confirmed; with ``requeue``, nack after
    ``after``; else ack. Then log ``note`` and count ``count`` (a metric of
    :class:`rabbitflow._metrics.Metrics` and its label beside the queue). ``final`` marks a
    delivery that failed for good (``DEAD_LETTER``, ``DROP``)."""

    action: Action
    reason: str = ""
    attempt: int = 1
    error: BaseException | None = None
    tier: str = ""
    delay_ms: int = 0
    not_before: str | None = None
    after: float = 0.0
    envelope: bool = False
    exchange: str = ""
    routing_key: str = ""
    headers: HeaderWriter | None = None
    requeue: bool = False
    final: bool = False
    note: Note | None = None
    count: tuple[str, str] | None = None
    expiration_ms: int = 0


ACK = Plan(Action.ACK, "ok")
# A delivery held while its copy failed, whose channel closed meanwhile: the broker has
# taken it back (nothing is sent).
RETURNED = Plan(Action.REQUEUE, "its channel closed while its copy was held")

# How much of an error's text a log line shows.
LOGGED_TEXT = 200

NOT_BEFORE_OUT_OF_RANGE = "not_before_out_of_range"
STORE_UNAVAILABLE = "store unavailable"
HEADERS_MOVED = (
    "headers too large for a frame: the message's own headers are in the body "
    "(a rabbitflow envelope)"
)


class OutcomePolicy:
    """Maps exceptions to plans for one consumer and applies its retry policy and routes."""

    __slots__ = (
        "_dead_letter_on",
        "_hold_limit",
        "_max_defer_ms",
        "_table",
        "crash_limit",
        "queue",
        "retry",
        "routes",
    )

    def __init__(
        self,
        retry: RetryPolicy,
        routes: QueueRoutes,
        retry_on: ExceptionTypes = (),
        dead_letter_on: ExceptionTypes = (),
        *,
        crash_limit: int = 10,
        consumer_timeout_ms: int | None = None,
    ) -> None:
        self.queue = routes.queue
        self._hold_limit = hold_limit(consumer_timeout_ms)
        self.retry = retry
        self.routes = routes
        self.crash_limit = crash_limit
        self._dead_letter_on = dead_letter_on
        self._max_defer_ms = retry.max_defer_ms
        table: dict[type[BaseException], Action] = {
            BaseException: Action.RETRY if not retry_on else Action.DEAD_LETTER,
            HandlerTimeout: Action.RETRY,
        }
        table.update(dict.fromkeys(retry_on, Action.RETRY))
        table.update(dict.fromkeys(dead_letter_on, Action.DEAD_LETTER))
        # Explicit requests from the handler and undecodable payloads are never overridden,
        # nor is a failure of rabbitflow's own store, which is never the message's.
        table.update(
            {
                Retry: Action.RETRY,
                Reject: Action.DEAD_LETTER,
                DecodeError: Action.DEAD_LETTER,
                StoreUnavailableError: Action.DEFER,
            }
        )
        self._table = table

    def action_for(self, exc: BaseException) -> Action:
        """``RETRY`` for a failure of the kind that is retried, else ``DEAD_LETTER``."""
        for cls in type(exc).__mro__:
            action = self._table.get(cls)
            if action is not None:
                return action
        return Action.RETRY  # unreachable: BaseException is in every MRO

    def attempt(self, delivery: DeliveredMessage, failed: FailedCopies) -> int:
        """The attempt ``delivery`` runs as: its ``rabbitflow-attempt`` header, or the attempt
        of its copy that was not published, when that is higher.

        The settler remembers such messages because a classic queue counts no redeliveries:
        the attempt the copy would have carried still counts, so ``max_attempts`` ends the
        loop."""
        headers = delivery.header.properties.headers
        attempt = read_attempt(headers) if headers else 1
        if failed.entries:
            unpublished = failed.plan(delivery)
            if unpublished is not None and unpublished.attempt > attempt:
                return unpublished.attempt
        return attempt

    def before_run(
        self, delivery: DeliveredMessage, attempt: int, losses: Losses, failed: FailedCopies
    ) -> Plan | None:
        """The plan of a delivery that must not run (None: run the handler), in this order:
        parked after ``crash_limit`` connection losses, deferred while its not-before is
        ahead, dead-lettered again when its DLQ copy was not published, settled unrun when
        it is a request whose caller gave up. A few tests on the hot path: each reads a
        header or a memory only when there is something in it."""
        if losses.counts:
            parked = self.after_connection_losses(losses.of(delivery), attempt)
            if parked is not None:
                return parked
        headers = delivery.header.properties.headers
        if headers and h.NOT_BEFORE in headers:
            value = headers[h.NOT_BEFORE]
            not_before = h.read_epoch(value)
            now = clock.now()
            if not_before is not None and not_before > now:
                text = value if isinstance(value, str) else _iso_at(not_before)
                return self.defer(attempt, not_before, now, text)
        if failed.entries:
            unpublished = failed.plan(delivery)
            if unpublished is not None and unpublished.final:
                return unpublished  # already due for the DLQ: it goes there without running
        if headers and h.DEADLINE in headers and expired(headers):
            # Acked without running: nobody waits for the reply, and a request is not a
            # message to keep (no DLQ copy: it could only be replayed to a caller that is
            # gone).
            note = Note(
                "warning",
                "request expired before it ran: its caller gave up waiting",
                {"deadline": _text(headers[h.DEADLINE])},
            )
            return Plan(Action.EXPIRED, "its caller gave up waiting", attempt, note=note)
        return None

    def decide(self, exc: BaseException, attempt: int) -> Plan:
        """The plan for a delivery whose handler failed on ``attempt``."""
        action = self.action_for(exc)
        if action is Action.DEAD_LETTER:
            return self.dead_letter(exc, attempt, self._dead_letter_reason(exc))
        if action is Action.DEFER:
            return self.store_wait(exc, attempt)
        if isinstance(exc, Retry) and not exc.spends_attempt and exc.delay_ms is not None:
            # Not the handler's failure: the message waits, whatever attempts it has left.
            now = clock.now()
            due = now + exc.delay_ms / 1000
            return self.defer(attempt, due, now, _iso_after(exc.delay_ms), write=True)
        if not self.retry.enabled:
            return self.dead_letter(exc, attempt, "retries disabled")
        if attempt >= self.retry.max_attempts:
            spent = f"max_attempts ({self.retry.max_attempts}) reached"
            return self.dead_letter(exc, attempt, spent)
        if not self.routes.tiers:
            # A stream has no tiers (a copy would be appended to it): attempts run in place.
            return self.dead_letter(exc, attempt, "no retry tiers (attempts run in place)")
        wanted = self.retry.delay_for(attempt + 1)
        if isinstance(exc, Retry) and exc.delay_ms is not None:
            wanted = max(exc.delay_ms, 0)
            if wanted > self._max_defer_ms:
                error = DeferralOutOfRange(self.queue, wanted, self._max_defer_ms)
                error.__cause__ = exc
                return self.dead_letter(error, attempt, NOT_BEFORE_OUT_OF_RANGE)
        delay, tier = self.routes.tier_at_least(wanted)
        # Beyond the largest tier the copy carries a not-before and hops tiers until it is due.
        not_before = _iso_after(wanted) if wanted > delay else None
        duration = format_duration(delay)
        note = Note(
            "warning",
            "retry scheduled",
            {
                "attempt": attempt,
                "next_attempt": attempt + 1,
                "delay": duration,
                "not_before": not_before,
                "error": h.error_type(exc),
                "reason": h.keep_head(str(exc), LOGGED_TEXT),
            },
        )
        return Plan(
            Action.RETRY,
            "retry",
            attempt + 1,
            exc,
            tier,
            delay,
            not_before,
            routing_key=tier,  # through the default exchange, straight to the tier queue
            headers=_retry_headers,
            note=note,
            count=("retries", duration),
        )

    def defer(
        self, attempt: int, not_before: float, now: float, text: str, *, write: bool = False
    ) -> Plan:
        """The plan for a delivery that must not run before ``not_before`` (epoch s, ``text``
        as written): its ``rabbitflow-not-before`` header is still ahead, or (``write``) a
        wait that spends no attempt asks for one, written on the copy."""
        remaining_ms = math.ceil((not_before - now) * 1000)
        if remaining_ms > self._max_defer_ms or not self.routes.tiers:
            error = DeferralOutOfRange(self.queue, remaining_ms, self._max_defer_ms)
            return self.dead_letter(error, attempt, NOT_BEFORE_OUT_OF_RANGE)
        # Hop through tiers that do not overshoot, so the message runs close to not-before.
        # The last hop, shorter than every tier, waits in the smallest one with a per-message
        # TTL of what is left: the broker dead-letters it back when either TTL is over. A
        # message expires only at the head of its queue, so one queued behind a longer wait
        # (a retry) can come back late by up to the tier's delay, never early.
        remaining_ms = max(remaining_ms, 1)
        delay, tier = self.routes.tier_at_most(remaining_ms)
        plan = self._deferral("not before", attempt, None, tier, delay, text, write)
        if delay <= remaining_ms:
            return plan
        return replace(plan, delay_ms=remaining_ms, expiration_ms=remaining_ms)

    def store_wait(self, exc: BaseException, attempt: int) -> Plan:
        """The plan for a delivery whose store did not answer: it waits, attempt unspent.

        Deferred through the smallest tier rather than requeued: a copy is a fresh message,
        so it costs nothing against a quorum queue's delivery limit. A queue without tiers
        (a stream) gets it back after a backoff instead."""
        if not self.routes.tiers:
            return Plan(
                Action.REQUEUE, STORE_UNAVAILABLE, attempt, exc, after=REQUEUE_BACKOFF, requeue=True
            )
        delay, tier = self.routes.tier_at_most(STORE_WAIT_MS)
        return self._deferral(STORE_UNAVAILABLE, attempt, exc, tier, delay, None, False)

    def _deferral(
        self,
        reason: str,
        attempt: int,
        exc: BaseException | None,
        tier: str,
        delay: int,
        text: str | None,
        write: bool,
    ) -> Plan:
        note = Note("debug", "deferred: not before its time", {"tier": tier, "not_before": text})
        return Plan(
            Action.DEFER,
            reason,
            attempt,
            exc,
            tier,
            delay,
            text,
            routing_key=tier,  # through the default exchange, straight to the tier queue
            headers=_deferred_headers_writing if write else _deferred_headers,
            note=note,
        )

    def retries_now(self, exc: BaseException, attempt: int) -> bool:
        """Whether a failure on ``attempt`` may be retried in process (``immediate_retries``).

        An explicit ``Retry`` asks for a delay, and a timeout already took its full time."""
        return (
            self.action_for(exc) is Action.RETRY
            and self.retry.enabled
            and attempt < self.retry.max_attempts
            and not isinstance(exc, Retry | HandlerTimeout)
        )

    def blame(self, exc: BaseException) -> Blame:
        """Whose failure ``exc`` is. A failure of the kind that is retried counts against the
        downstream even when this message is not retried (attempts spent, retry = false); a
        ``Reject``, a bad payload or a ``dead_letter_on`` type is the message's fault, not
        the downstream's; a wait that spends no attempt (a duplicate waiting for its twin)
        is nobody's; a failure of rabbitflow's own store pauses the consumers that need it."""
        if isinstance(exc, StoreUnavailableError):
            return Blame.STORE
        if self.action_for(exc) is not Action.RETRY:
            return Blame.NOBODY
        if isinstance(exc, Retry) and not exc.spends_attempt:
            return Blame.NOBODY
        return Blame.DOWNSTREAM

    def dead_letter(self, exc: BaseException | None, attempt: int, reason: str) -> Plan:
        """Dead-letter, or drop (loudly) when the queue has no DLQ."""
        kind, detail = h.error_type(exc), h.keep_head(str(exc), LOGGED_TEXT)
        count = ("dead_lettered", kind)
        dlx = self.routes.dead_letter_exchange
        if not dlx:
            fields = {"attempt": attempt, "error": kind, "reason": reason}
            note = Note("error", "message dropped: the queue has dead_letter = false", fields)
            return Plan(Action.DROP, reason, attempt, exc, final=True, note=note, count=count)
        fields = {"attempt": attempt, "error": kind, "reason": reason, "detail": detail}
        return Plan(
            Action.DEAD_LETTER,
            reason,
            attempt,
            exc,
            # The DLX routes a dead letter by the name of the queue it failed in.
            exchange=dlx,
            routing_key=self.queue,
            headers=_dead_letter_headers,
            final=True,
            note=Note("error", "message dead-lettered", fields),
            count=count,
        )

    def after_publish_failure(self, plan: Plan, failures: int, held: float | None = None) -> Plan:
        """The plan once ``plan``'s copy failed to publish for the ``failures``-th time.

        ``held`` is how long the delivery has been in hand since its copy first failed, when
        returning it would count toward the queue's delivery limit (RabbitMQ before 4.3), and
        None when a ``basic.nack`` returns it for free (4.3+). Where a return counts, the copy
        is published again after the backoff with the delivery still in hand, up to the hold
        limit; otherwise, and past that limit, the original goes back to its queue after the
        backoff. Either way a missing or refused target never turns into a hot loop."""
        after = min(REQUEUE_BACKOFF * 2 ** max(failures - 1, 0), REQUEUE_BACKOFF_MAX)
        if held is not None and held + after <= self._hold_limit:
            return replace(plan, after=after)
        reason = f"{plan.action.value} copy not published"
        return Plan(
            Action.REQUEUE, reason, plan.attempt, plan.error, plan.tier, after=after, requeue=True
        )

    def after_frame_too_large(self, plan: Plan, error: FrameTooLarge) -> Plan | None:
        """The plan once ``plan``'s copy did not fit in a frame without its error details.

        The message's own headers leave no room for rabbitflow's: it cannot be retried (a
        retry copy without its attempt would loop), so it is dead-lettered at once with its
        headers moved into the body, where ``rabbitflow dlq replay`` finds them. None when
        even that copy does not fit (rabbitflow's own headers too large, which a frame_max
        of at least 4 KiB rules out): the copy failed like any unpublished copy."""
        if plan.envelope:
            return None
        if plan.final:
            reason, attempt = f"{plan.reason}; {HEADERS_MOVED}", plan.attempt
        else:
            # A retry copy carries the next attempt; the dead letter the one that ran.
            reason = HEADERS_MOVED
            attempt = plan.attempt - 1 if plan.action is Action.RETRY else plan.attempt
        return replace(self.dead_letter(plan.error or error, attempt, reason), envelope=True)

    def after_connection_losses(self, losses: int, attempt: int) -> Plan | None:
        """The plan of a delivery whose message was in hand when the connection was lost,
        ``losses`` times in a row; None when it may run again.

        A message that keeps taking the connection down with it (or keeps being in hand when
        something else does) is parked in the DLQ after ``crash_limit`` losses instead of
        running again; every queue type alike, since a classic queue counts no redeliveries
        and a quorum queue's ``delivery-limit`` only counts returns, whatever caused them."""
        if losses < self.crash_limit:
            return None
        error = CrashLimitReached(self.queue, losses, self.crash_limit)
        reason = f"connection lost {losses} times while this message was in hand"
        return self.dead_letter(error, attempt, reason)

    def _dead_letter_reason(self, exc: BaseException) -> str:
        if isinstance(exc, Reject):
            return "rejected by the handler"
        if isinstance(exc, DecodeError):
            return "undecodable payload"
        if any(isinstance(exc, cls) for cls in self._dead_letter_on):
            return "matches dead_letter_on"
        return "not in retry_on"


def expired(headers: Mapping[str, Any] | None) -> bool:
    """Whether these are the headers of a request whose ``rabbitflow-deadline`` has passed
    on this host's clock (a dict lookup for every other message).

    No tolerance for clock skew: a worker whose clock is ahead by ``d`` settles requests in
    the last ``d`` of their caller's wait, which could rarely be answered in time anyway; one
    behind runs them up to ``d`` late, no later than the broker's TTL. A value that is not
    a timestamp is ignored (the request runs)."""
    if not headers or h.DEADLINE not in headers:
        return False
    deadline = h.read_epoch(headers[h.DEADLINE])
    return deadline is not None and clock.now() > deadline


def hold_limit(consumer_timeout_ms: int | None) -> float:
    """How long a delivery whose copy keeps failing is held before it is returned (seconds)."""
    if consumer_timeout_ms is None:
        return HOLD_LIMIT
    return min(HOLD_LIMIT, consumer_timeout_ms / 4000)


def settled_for_good(planned: Plan, done: Plan) -> bool:
    """Whether a delivery failed for good and was settled as planned (its DLQ copy
    confirmed, or dropped): the caller of a request then learns it at once."""
    return planned.final and done.action is planned.action and planned.error is not None


def _iso_after(delay_ms: int) -> str:
    return _iso_at(clock.utcnow().timestamp() + delay_ms / 1000)


def _iso_at(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _origin(delivery: DeliveredMessage, queue: str) -> tuple[str, str, str]:
    return queue, delivery.exchange or "", delivery.routing_key or ""


def _due_at(plan: Plan) -> str:
    # When the copy leaves its tier: what `rabbitflow retries list` shows as due.
    return h.write_time(clock.now() + plan.delay_ms / 1000)


def _retry_headers(delivery: DeliveredMessage, plan: Plan, queue: str) -> dict[str, Any]:
    old = delivery.header.properties.headers
    headers = h.failure_copy(
        old, _origin(delivery, queue), plan.attempt, plan.error, plan.not_before, None
    )
    headers[h.DUE_AT] = _due_at(plan)
    return headers


def _deferred_headers(delivery: DeliveredMessage, plan: Plan, queue: str) -> dict[str, Any]:
    # A not-before still ahead is carried as it is, with the message's other headers.
    headers = h.deferred_copy(delivery.header.properties.headers, None)
    headers[h.DUE_AT] = _due_at(plan)
    return headers


def _deferred_headers_writing(delivery: DeliveredMessage, plan: Plan, queue: str) -> dict[str, Any]:
    headers = h.deferred_copy(delivery.header.properties.headers, plan.not_before)
    headers[h.DUE_AT] = _due_at(plan)
    return headers


def _dead_letter_headers(delivery: DeliveredMessage, plan: Plan, queue: str) -> dict[str, Any]:
    old = delivery.header.properties.headers
    return h.failure_copy(
        old, _origin(delivery, queue), plan.attempt, plan.error, plan.not_before, plan.reason
    )
