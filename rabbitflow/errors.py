"""Every error rabbitflow raises derives from :class:`RabbitflowError` and carries its data.

Two exceptions are control flow for handlers rather than failures: :class:`Retry` asks for a
delayed retry no earlier than a delay, :class:`Reject` sends the message to the dead-letter
queue at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class RabbitflowError(Exception):
    """Root of every rabbitflow error."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes and contexts, each once.

    aiormq chains connection errors back onto themselves (a reset raised while handling
    its own reset), so a walk that follows ``__cause__`` / ``__context__`` must stop at an
    exception it has already seen."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a topology file: where, what, and how to fix it."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.message}{hint}"


class TopologyError(RabbitflowError):
    """A topology file that cannot be used; lists every problem found in it."""

    def __init__(
        self, source: str, problems: Sequence[Problem], warnings: Sequence[Problem] = ()
    ) -> None:
        self.source = source
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)  # likely mistakes that are not errors
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{self.source}: {count} error{'s' if count != 1 else ''}"
        lines = [f"  {problem}" for problem in self.problems]
        return "\n".join([head, *lines, *(f"  warning: {w}" for w in self.warnings)])


class TopologySyntaxError(TopologyError):
    """The file is not valid TOML (or not UTF-8); names the line and column."""

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        self.line = line
        self.column = column
        self.detail = message
        RabbitflowError.__init__(self, f"{source}:{line}:{column}: {message}")
        self.source = source
        self.problems = (Problem(f"line {line}, column {column}", message),)
        self.warnings = ()

    def render(self) -> str:
        return f"{self.source}:{self.line}:{self.column}: {self.detail}"


class ConfigurationError(RabbitflowError):
    """The application is wired wrongly (handler for an unknown queue, bad import string...)."""


class ImportStringError(ConfigurationError):
    """``module:app`` (``rabbitflow run``) could not be turned into an :class:`App`.

    ``target`` is the import string as given, when known."""

    def __init__(self, message: str, *, target: str = "") -> None:
        self.target = target
        super().__init__(message)


class UserImportError(ImportStringError):
    """The user's module raised while being imported; carries its traceback."""

    def __init__(self, module: str, trace: str) -> None:
        self.module = module
        self.trace = trace
        super().__init__(f"importing {module!r} failed:\n{trace}", target=module)


class InvalidUrlError(ConfigurationError):
    """A broker URL that cannot be used; names it with its password masked (``url`` is
    given masked: ``rabbitflow._urls`` masks it before raising)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"broker URL {self.url}: {reason}")


class OutputError(RabbitflowError):
    """A file a command was told to write (``--output``) cannot be written."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot write {path!r}: {reason}")


class BrokerError(RabbitflowError):
    """The broker could not be reached or refused an operation.

    ``doing`` names the operation (``"purging 'q.dlq'"``) and ``reason`` is the broker's or
    the client's own words, when the error was converted from an AMQP failure."""

    def __init__(self, message: str, *, doing: str = "", reason: str = "") -> None:
        self.doing = doing
        self.reason = reason or message
        super().__init__(message)


class ManagementUnavailable(RabbitflowError):
    """RabbitMQ's management HTTP API did not answer or refused. ``url`` is the API's, its
    password masked by the caller; ``reason`` says why, for the user."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class UnreachableBrokerError(BrokerError):
    """No connection could be opened to the broker; ``url`` has its password masked."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(f"cannot connect to {url}: {reason}", doing="connecting", reason=reason)


class TlsVerificationError(BrokerError):
    """The broker's TLS certificate could not be verified (or verification was turned off).

    ``url`` is the broker's, password masked."""

    def __init__(self, message: str, *, url: str, reason: str = "") -> None:
        self.url = url
        super().__init__(message, doing="connecting", reason=reason)


class AccessRefusedError(BrokerError):
    """The broker refused an operation for lack of permission (AMQP 403)."""


class TopologyConflictError(BrokerError):
    """An object exists on the broker with other properties than the file asks for."""

    def __init__(
        self,
        kind: str,
        name: str,
        argument: str,
        broker_value: object,
        file_value: object,
        *,
        resolve: str | None = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.argument = argument
        self.broker_value = broker_value
        self.file_value = file_value
        # How to resolve it (the command that migrates the queue, or why nothing can), when
        # the whole file was checked first: then nothing was declared.
        self.resolve = resolve
        if resolve is not None:
            super().__init__(
                f"{kind} {name!r}: {argument}: broker {_shown(broker_value)}, file "
                f"{_shown(file_value)}; {resolve}"
            )
            return
        super().__init__(
            f"{kind} {name!r} exists with {_setting(argument, broker_value)} on the broker, "
            f"but the topology file asks for {_setting(argument, file_value)}; "
            "RabbitMQ cannot change it in place: delete the object (after draining it) "
            "or keep the broker's value in the file"
        )


def _shown(value: object) -> str:
    return "not set" if value is None else repr(value)


def _setting(argument: str, value: object) -> str:
    # None: the argument is not set on that side (RabbitMQ's "received none").
    return f"no {argument}" if value is None else f"{argument} = {value!r}"


class TopologyMismatchError(BrokerError):
    """Objects the topology needs are missing from the broker (seen with ``--no-declare``).

    ``missing`` names each one with its kind: ``("exchange 'orders'", "queue 'billing'")``."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(
            f"missing on the broker: {', '.join(self.missing)}; "
            "run `rabbitflow topology declare` first",
            doing="checking the topology",
        )


class QueueNotFoundError(BrokerError):
    """A queue an operation needs does not exist on the broker (AMQP 404 on a passive declare)."""

    def __init__(self, queue: str, vhost: str, hint: str = "") -> None:
        self.queue = queue
        self.vhost = vhost
        self.hint = hint
        detail = f": {hint}" if hint else ""
        super().__init__(f"queue {queue!r} does not exist in vhost {vhost!r}{detail}")


class PublishError(RabbitflowError):
    """A message was not published: the broker did not confirm it, or it never reached the
    broker (:class:`PublishConnectionError`).

    Every way :meth:`App.publish`, :meth:`App.publish_many` (``app.batch()``) and
    :meth:`App.request` (until the request is sent) can fail to hand a message to the broker
    raises a subclass of this one. ``missing`` is true when the target does not exist: the
    exchange is missing (404) or no queue is bound for the routing key (the message was
    returned)."""

    def __init__(
        self, exchange: str, routing_key: str, reason: str, *, missing: bool = False
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.reason = reason
        self.missing = missing
        super().__init__(
            f"publish to exchange {exchange!r} with routing key {routing_key!r} failed: {reason}"
        )


class UnroutableError(PublishError):
    """A mandatory publish was returned: no queue is bound for its routing key."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(
            exchange, routing_key, "unroutable (no queue bound for this routing key)", missing=True
        )


class PublishConnectionError(PublishError, BrokerError):
    """A message not handed to the broker because no connection or channel could be had:
    nothing was sent, so publishing it again cannot make a duplicate.

    Both a :class:`PublishError` (``exchange``, ``routing_key``; ``except PublishError``
    catches every way a message can fail to be published) and a :class:`BrokerError` (the
    failure is the connection's: ``doing``, ``reason``, and the fields of the error it
    stands for). :meth:`of` picks the subclass that is also that error's class, so code that
    catches :class:`UnreachableBrokerError`, :class:`AccessRefusedError` or
    :class:`TlsVerificationError` around a publish keeps catching it."""

    def __init__(self, exchange: str, routing_key: str, error: BrokerError) -> None:
        # The broker error's data (doing, reason, url...) on this error too.
        self.__dict__.update(vars(error))
        self.exchange = exchange
        self.routing_key = routing_key
        self.missing = False
        # Past both parents' __init__, whose super() calls would meet each other's arguments.
        RabbitflowError.__init__(
            self,
            f"publish to exchange {exchange!r} with routing key {routing_key!r} failed: {error}",
        )

    @classmethod
    def of(cls, error: BrokerError, exchange: str, routing_key: str) -> PublishConnectionError:
        """``error`` (raised while connecting for a publish to ``exchange`` with
        ``routing_key``) as the publish error of its kind."""
        if isinstance(error, PublishConnectionError):
            return error
        kind = next(k for k in type(error).__mro__ if k in _PUBLISH_KINDS)
        return _PUBLISH_KINDS[kind](exchange, routing_key, error)


class PublishUnreachableError(PublishConnectionError, UnreachableBrokerError):
    """Not published: the broker could not be reached (an :class:`UnreachableBrokerError`
    too; ``url`` has its password masked)."""


class PublishAccessRefusedError(PublishConnectionError, AccessRefusedError):
    """Not published: the broker refused the login, the vhost or the channel (an
    :class:`AccessRefusedError` too)."""


class PublishTlsError(PublishConnectionError, TlsVerificationError):
    """Not published: the broker's TLS certificate could not be verified (a
    :class:`TlsVerificationError` too; ``url`` has its password masked)."""


_PUBLISH_KINDS: dict[type[BrokerError], type[PublishConnectionError]] = {
    UnreachableBrokerError: PublishUnreachableError,
    AccessRefusedError: PublishAccessRefusedError,
    TlsVerificationError: PublishTlsError,
    BrokerError: PublishConnectionError,
}


class FrameTooLarge(PublishError):
    """A message's properties and headers do not fit in one AMQP frame of the connection.

    RabbitMQ sends the properties (headers included) in one content-header frame; a frame
    larger than the connection's negotiated ``frame_max`` is a connection error
    (``FRAME_ERROR ... frame_too_large``) that would close every channel of the connection.
    rabbitflow refuses such a publish before it is sent: ``size`` is the frame it would have
    been, ``frame_max`` the limit."""

    def __init__(self, exchange: str, routing_key: str, size: int, frame_max: int) -> None:
        self.size = size
        self.frame_max = frame_max
        super().__init__(
            exchange,
            routing_key,
            f"its properties and headers take a {size}-byte frame, over the connection's "
            f"frame_max of {frame_max} bytes",
        )


@dataclass(frozen=True, slots=True)
class BatchFailure:
    """One message of a batch that the broker did not confirm.

    ``sent`` is false when the message was never written to the connection (the broker
    cannot have it); true when it was written and then returned, nacked or left without a
    confirm: a nacked or returned message is not queued, one left unconfirmed may be."""

    index: int
    message_id: str
    error: PublishError
    sent: bool


class BatchPublishError(PublishError):
    """Some messages of :meth:`App.publish_many` were not confirmed; the rest were.

    ``failures`` lists each unconfirmed message by its index in the batch and its
    ``message_id``; ``message_ids`` holds the ids of the whole batch, in order, and
    ``confirmed`` those the broker confirmed."""

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        failures: Sequence[BatchFailure],
        message_ids: Sequence[str],
    ) -> None:
        self.failures = tuple(failures)
        self.message_ids = tuple(message_ids)
        first = self.failures[0]
        reason = (
            f"{len(self.failures)} of {len(self.message_ids)} messages not confirmed; "
            f"first: #{first.index} ({first.message_id}): {first.error.reason}"
        )
        missing = all(f.error.missing for f in self.failures)
        super().__init__(exchange, routing_key, reason, missing=missing)

    @property
    def confirmed(self) -> tuple[str, ...]:
        failed = {f.index for f in self.failures}
        return tuple(m for i, m in enumerate(self.message_ids) if i not in failed)


class WorkflowError(ConfigurationError):
    """A workflow that ``app.start()`` cannot run: refused before anything is published
    (a nesting rabbitflow does not run, a payload on a step that takes the one before's
    result, a group without a jobs store). ``reason`` says which and how to write it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class DecodeError(RabbitflowError):
    """A message body that cannot be decoded or validated; it goes to the DLQ at once."""

    def __init__(self, queue: str, reason: str) -> None:
        self.queue = queue
        self.reason = reason
        super().__init__(reason)


class HandlerTimeout(RabbitflowError):
    """A handler ran longer than its queue's ``timeout``; retried like any failure."""

    def __init__(self, queue: str, seconds: float) -> None:
        self.queue = queue
        self.seconds = seconds
        super().__init__(f"handler for {queue!r} did not finish within {seconds:g}s")


class DeferralOutOfRange(RabbitflowError):
    """A message's ``rabbitflow-not-before`` (or a ``Retry`` delay) lies beyond ``max_defer``:
    it is dead-lettered instead of bouncing through the retry tiers for that long."""

    def __init__(self, queue: str, ahead_ms: int, max_defer_ms: int) -> None:
        self.queue = queue
        self.ahead_ms = ahead_ms
        self.max_defer_ms = max_defer_ms
        super().__init__(
            f"not before {ahead_ms / 1000:.0f}s from now, beyond max_defer "
            f"({max_defer_ms / 1000:.0f}s) of queue {queue!r}"
        )


class StoreUnavailableError(RabbitflowError):
    """A store rabbitflow itself uses (the idempotency store; job status later) did not
    answer: unreachable, failing, or slower than its deadline.

    Never the message's fault: the message waits (deferred, no attempt spent) and the
    consumers that need the store pause until it answers. ``store`` is the store object,
    ``operation`` the call that failed (``"claim"``), ``cause`` the client's own error
    (also ``__cause__``)."""

    def __init__(self, store: object, operation: str, cause: BaseException) -> None:
        self.store = store
        self.operation = operation
        self.cause = cause
        detail = str(cause) or type(cause).__name__
        super().__init__(f"{store!r} did not answer {operation}: {detail}")


class CrashLimitReached(RabbitflowError):
    """The connection was lost ``losses`` times in a row while a message was in hand: it is
    parked in the DLQ instead of being run again (``crash_limit`` of its queue)."""

    def __init__(self, queue: str, losses: int, crash_limit: int) -> None:
        self.queue = queue
        self.losses = losses
        self.crash_limit = crash_limit
        super().__init__(
            f"connection lost {losses} times while this message was in hand "
            f"(crash_limit {crash_limit} of queue {queue!r})"
        )


class Retry(RabbitflowError):
    """Raise in a handler to retry the message no earlier than ``delay``.

    ``delay`` is a duration string (``"2m"``), milliseconds as an int, or seconds as a float
    (e.g. a ``Retry-After`` header value)."""

    def __init__(self, delay: str | int | float | None = None, reason: str = "") -> None:
        from rabbitflow._duration import parse_duration

        if isinstance(delay, float):
            self.delay_ms: int | None = round(delay * 1000)
        else:
            self.delay_ms = None if delay is None else parse_duration(delay)
        self.reason = reason
        super().__init__(reason or f"retry requested (delay {delay})")

    #: Whether waiting counts as an attempt. A wait that is not the handler's failure (a
    #: duplicate waiting for its twin's lease) defers the message instead, attempt unchanged.
    spends_attempt = True

    @classmethod
    def after(
        cls,
        header_value: str | None,
        *,
        default: str | int | float | None = None,
        reason: str = "",
        now: float | None = None,
    ) -> Retry:
        """A retry no earlier than an HTTP ``Retry-After`` header asks.

        ``header_value`` is delay-seconds (``"120"`` is 120 seconds, where ``Retry(120)`` would
        be 120 ms) or an HTTP date (``"Wed, 21 Oct 2026 07:28:00 GMT"``; a date in the past
        means now). A missing or unreadable value gives ``Retry(default)``: ``None`` retries
        after the queue's next tier. ``now`` (a Unix time) is for tests."""
        seconds = retry_after_seconds(header_value, now)
        if seconds is None:
            return cls(default, reason)
        return cls(float(seconds), reason or f"Retry-After: {header_value}")


def retry_after_seconds(header_value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value (RFC 9110 section 10.2.3), or None
    when it is missing or neither delay-seconds nor an HTTP date."""
    import email.utils
    from datetime import UTC

    if header_value is None:
        return None
    value = header_value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322's "UTC, origin unknown"
        when = when.replace(tzinfo=UTC)
    if now is None:
        from rabbitflow import _clock as clock

        now = clock.now()
    return max(when.timestamp() - now, 0.0)


class Reject(RabbitflowError):
    """Raise in a handler to send the message to its dead-letter queue without retrying."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        self.reason = reason
        super().__init__(reason)


class RequestTimeout(RabbitflowError):
    """``app.request()`` got no reply within its ``timeout``.

    ``sent`` says what became of the request. ``False``: the timeout passed before it was
    handed to the broker, so no handler will ever run it and it is safe to send again.
    ``True``: it was published, so its handler may have run (the reply came too late or not
    at all), but none will start it after the deadline: the request carries the deadline and
    expires (see docs/handlers.md). ``message_id`` names the request in the worker's logs."""

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        seconds: float,
        *,
        sent: bool = True,
        message_id: str | None = None,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.seconds = seconds
        self.sent = sent
        self.message_id = message_id
        fate = (
            "sent; it will not run after that"
            if sent
            else "not sent: the timeout passed before the broker had it"
        )
        super().__init__(
            f"no reply to the request on exchange {exchange!r} with routing key "
            f"{routing_key!r} within {seconds:g}s ({fate})"
        )


class JobError(RabbitflowError):
    """Root of the errors of a job (``app.enqueue()``, contract section 12); ``job_id`` is
    the job's id (its message_id)."""

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        super().__init__(message)


class JobFailed(JobError):
    """The job failed for good: its message is in the dead-letter queue (or was dropped).

    ``error`` is the last failure as the worker recorded it (``"KeyError: 'x'"``),
    ``error_type`` its exception's qualified name, ``attempt`` the attempt it failed on."""

    def __init__(
        self, job_id: str, error: str | None, *, error_type: str | None = None, attempt: int = 0
    ) -> None:
        self.error = error
        self.error_type = error_type
        self.attempt = attempt
        detail = f": {error}" if error else ""
        super().__init__(job_id, f"job {job_id!r} failed on attempt {attempt}{detail}")


class JobCancelled(JobError):
    """The job was cancelled (``job.cancel()``) before it finished."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id!r} was cancelled")


class JobTimeout(RequestTimeout):
    """``job.result(timeout=)`` saw no end of the job within ``timeout`` seconds; the job
    goes on (it may still end later: ask again, or read ``app.jobs.get(id)``)."""

    def __init__(self, job_id: str, seconds: float, state: str | None) -> None:
        super().__init__("", "", seconds, sent=True, message_id=job_id)
        self.job_id = job_id
        self.state = state
        Exception.__init__(
            self, f"job {job_id!r} did not finish within {seconds:g}s (state: {state or 'unknown'})"
        )


class JobResultError(Reject):
    """A tracked handler's return value cannot be kept as the job's result: not JSON, or
    larger than the store's limit. Nothing is truncated: the message is dead-lettered
    (no retry would change the value) and the job ends ``failed`` with this error."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        super().__init__(f"the result of job {job_id!r} cannot be kept: {reason}")


class DrainError(RabbitflowError):
    """``TestApp.drain()`` could not finish: a handler hangs, messages loop, or the in-memory
    broker saw an error; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class RemoteError(RabbitflowError):
    """The handler of a request failed for good; ``type`` and ``message`` are its exception's."""

    def __init__(self, type: str, message: str) -> None:
        self.type = type
        self.message = message
        super().__init__(f"{type}: {message}" if message else type)
