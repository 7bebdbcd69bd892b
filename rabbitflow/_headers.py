"""The message headers rabbitflow writes (contract section 3): their names, how their values
are written (bounded text, error types) and read back (times).

They carry no ``x-`` prefix: RabbitMQ reserves that for its own headers (``x-death``,
``x-delivery-count``...).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from rabbitflow import _clock as clock
from rabbitflow._duration import DURATION_HINT, parse_duration

ATTEMPT = "rabbitflow-attempt"
ORIGIN_QUEUE = "rabbitflow-origin-queue"
ORIGIN_EXCHANGE = "rabbitflow-origin-exchange"
ORIGIN_ROUTING_KEY = "rabbitflow-origin-routing-key"
FIRST_FAILED_AT = "rabbitflow-first-failed-at"
ERROR_TYPE = "rabbitflow-error-type"
ERROR_MESSAGE = "rabbitflow-error-message"
ERROR_STACK = "rabbitflow-error-stack"
REPLAY_COUNT = "rabbitflow-replay-count"
NOT_BEFORE = "rabbitflow-not-before"
DEAD_LETTER_REASON = "rabbitflow-dead-letter-reason"
DUE_AT = "rabbitflow-due-at"
# When the caller of a request stops waiting for its reply (ISO-8601 UTC): past it, a worker
# settles the request without running it.
DEADLINE = "rabbitflow-deadline"
# The routing slip of a workflow step (rabbitflow.workflows): JSON text naming the workflow,
# this step and the steps after it. Kept on retries, dead letters and replays like a user's
# header, so that a replayed step carries its workflow on.
WORKFLOW = "rabbitflow-workflow"

ERROR_MESSAGE_LIMIT = 1024
ERROR_STACK_LIMIT = 8 * 1024

# Headers that describe one failure; a new failure replaces them instead of accumulating.
FAILURE_HEADERS = frozenset(
    {ERROR_TYPE, ERROR_MESSAGE, ERROR_STACK, NOT_BEFORE, DEAD_LETTER_REASON, DUE_AT}
)
# Every header rabbitflow writes. A copy whose headers do not fit in a frame keeps these and
# moves every other header into its body (see rabbitflow._envelope).
OWN = frozenset(
    {
        ATTEMPT,
        ORIGIN_QUEUE,
        ORIGIN_EXCHANGE,
        ORIGIN_ROUTING_KEY,
        FIRST_FAILED_AT,
        REPLAY_COUNT,
    }
    | FAILURE_HEADERS
)
# Set by the broker on dead-lettering and redelivery; never copied onto a republished message,
# so that x-death cannot grow without bound across retries.
BROKER_HEADERS_PREFIX = "x-"


def carried_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """User and trace headers kept on a copy; broker ``x-*`` and old failure headers dropped."""
    if not headers:
        return {}
    return {
        key: value
        for key, value in headers.items()
        if not key.startswith(BROKER_HEADERS_PREFIX) and key not in FAILURE_HEADERS
    }


def keep_head(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, its start kept; ``...`` marks a cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: max(limit - 3, 0)].decode("utf-8", "ignore") + "..."


def keep_tail(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, its end kept; ``...`` marks a cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return "..." + data[len(data) - max(limit - 3, 0) :].decode("utf-8", "ignore")


def error_type(exc: BaseException | None) -> str:
    """``rabbitflow-error-type``: the exception's qualified class name (builtins bare)."""
    if exc is None:
        return ""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def error_stack(exc: BaseException) -> str:
    """``rabbitflow-error-stack``: the traceback, bounded. Each chunk (a frame, an exception
    line) to the error-message limit, so that a huge exception message cannot push the frames
    out; then the whole to the stack limit, keeping the end, where the failure is."""
    chunks = traceback.TracebackException.from_exception(exc).format()
    return keep_tail("".join(_bounded_chunk(chunk) for chunk in chunks), ERROR_STACK_LIMIT)


def _bounded_chunk(chunk: str) -> str:
    bounded = keep_head(chunk, ERROR_MESSAGE_LIMIT)
    return bounded if bounded is chunk or not chunk.endswith("\n") else bounded + "\n"


def write_time(epoch: float) -> str:
    """A time header rabbitflow writes (``-first-failed-at``, ``-due-at``): ISO-8601 UTC to
    the millisecond, ``Z``-suffixed."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def failure_copy(
    old: Mapping[str, Any] | None,
    origin: tuple[str, str, str],
    attempt: int,
    error: BaseException | None,
    not_before: str | None,
    reason: str | None,
) -> dict[str, Any]:
    """The headers of a copy written after a failure: ``old``'s carried headers, the origin
    (queue, exchange, routing key) and first-failure time of the first failure, the attempt
    the copy carries, the error; with ``reason``, a dead letter's reason and stack."""
    old = old or {}
    headers = carried_headers(old)
    queue, exchange, routing_key = origin
    if ATTEMPT in old:
        headers.setdefault(ORIGIN_QUEUE, queue)
        headers.setdefault(ORIGIN_EXCHANGE, exchange)
        headers.setdefault(ORIGIN_ROUTING_KEY, routing_key)
        headers.setdefault(FIRST_FAILED_AT, write_time(clock.now()))
    else:
        # A first failure: these headers are rabbitflow's, whatever a publisher put there.
        headers[ORIGIN_QUEUE] = queue
        headers[ORIGIN_EXCHANGE] = exchange
        headers[ORIGIN_ROUTING_KEY] = routing_key
        headers[FIRST_FAILED_AT] = write_time(clock.now())
        headers.pop(REPLAY_COUNT, None)
    headers[ATTEMPT] = attempt
    headers[ERROR_TYPE] = error_type(error)
    headers[ERROR_MESSAGE] = keep_head(str(error), ERROR_MESSAGE_LIMIT)
    if not_before is not None:
        headers[NOT_BEFORE] = not_before
    if reason is not None:
        headers[DEAD_LETTER_REASON] = reason
        if error is not None:
            headers[ERROR_STACK] = error_stack(error)
    return headers


def deferred_copy(old: Mapping[str, Any] | None, not_before: str | None) -> dict[str, Any]:
    """The headers of a deferred copy: ``old``'s own, unchanged (a deferral is not a
    failure), but the broker's ``x-*``; and the not-before the copy waits for, if given."""
    headers = (
        {k: v for k, v in old.items() if not k.startswith(BROKER_HEADERS_PREFIX)} if old else {}
    )
    if not_before is not None:
        headers[NOT_BEFORE] = not_before
    return headers


def read_time(value: object) -> datetime | None:
    """A time header (``rabbitflow-not-before``, ``-due-at``, ``-deadline``,
    ``-first-failed-at``, ``x-death``'s ``time``): ISO-8601 text or bytes, or an AMQP
    timestamp; a time without a zone is UTC. None when absent or malformed: a header is
    input from any publisher, never a reason to fail."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not value:
        return None
    try:
        return read_time(datetime.fromisoformat(value))
    except ValueError:
        return None


def not_before_after(delay: object) -> str:
    """``rabbitflow-not-before`` for a message published now that must wait ``delay``
    (``"10m"``, milliseconds, or a ``timedelta``): ISO-8601 UTC, to the microsecond.

    Raises ``ValueError`` naming the value when it is not a duration or is negative."""
    if isinstance(delay, timedelta):
        delay_ms = delay.total_seconds() * 1000
    else:
        delay_ms = parse_duration(delay)
    if delay_ms < 0:
        raise ValueError(f"delay {delay!r} is negative; {DURATION_HINT}")
    return datetime.fromtimestamp(clock.now() + delay_ms / 1000, UTC).isoformat()


def read_epoch(value: object) -> float | None:
    """:func:`read_time` as epoch seconds."""
    moment = read_time(value)
    if moment is None:
        return None
    try:
        return moment.timestamp()
    except (OverflowError, ValueError, OSError):
        return None


def drop(text: str, limit: int) -> None:
    """A header that is whole or not at all (a time, a name): dropped when it must be cut."""
    return None


Trims = tuple[tuple[str, Callable[[str, int], str | None]], ...]

# What a copy gives up, in this order, when its properties would not fit in one frame: the
# start of the traceback (its end is where the failure is), then the end of the error
# message. The error type and the rest always stay.
TRIMMABLE: Trims = ((ERROR_STACK, keep_tail), (ERROR_MESSAGE, keep_head))
# What a DLQ replay gives up: where and when the message first failed (a later failure
# writes them again from its own delivery). The attempt and replay count always stay.
REPLAY_TRIMMABLE: Trims = (
    (FIRST_FAILED_AT, drop),
    (ORIGIN_ROUTING_KEY, drop),
    (ORIGIN_EXCHANGE, drop),
    (ORIGIN_QUEUE, drop),
)
