"""structlog set-up: JSON lines for machines, coloured console output for people."""

from __future__ import annotations

import logging
import os
import re
import sys
from contextvars import ContextVar
from typing import Any

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, WrappedLogger

from rabbitflow.types import LogFormat

_renders_json = False
_SECRET_IN_URL = re.compile(r"(amqps?://[^:/@\s]+:)[^@\s]+@")


# (queue, message_id, attempt) of the delivery being handled. Each delivery runs in a task of
# its own (and sync handlers in a copy of its context), so this never leaks between messages.
DELIVERY: ContextVar[tuple[str, str | None, int] | None] = ContextVar(
    "rabbitflow_delivery", default=None
)


def add_delivery_context(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """``queue``, ``message_id``, ``attempt``, ``trace_id``, ``span_id`` on every line logged
    while a delivery is handled, handler logs included."""
    current = DELIVERY.get()
    if current is not None:
        event.setdefault("queue", current[0])
        event.setdefault("message_id", current[1])
        event.setdefault("attempt", current[2])
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def mask_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Defence in depth: hide a password in any AMQP URL that reaches a log line."""
    for key, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[key] = _SECRET_IN_URL.sub(r"\1***@", value)
    return event


class _Logger:
    """A structlog logger that, until logging is configured, behaves as a stdlib logger.

    A library user's process (a web app calling ``app.publish``) then sees rabbitflow's lines
    only as its own logging set-up decides: by default warnings and errors on stderr, nothing
    on stdout. Once :func:`configure_logging` (``rabbitflow run``) or the user configures
    structlog, lines go through structlog's configuration."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._stdlib: Any = structlog.wrap_logger(
            logging.getLogger(name),
            processors=[structlog.stdlib.filter_by_level, mask_secrets, _one_line],
            wrapper_class=structlog.stdlib.BoundLogger,
        )

    def __getattr__(self, method: str) -> Any:
        target = structlog.get_logger(self._name) if structlog.is_configured() else self._stdlib
        return getattr(target, method)


def _one_line(_: WrappedLogger, __: str, event: EventDict) -> str:
    message = str(event.pop("event", ""))
    fields = " ".join(f"{key}={value}" for key, value in event.items())
    return f"{message} ({fields})" if fields else message


def get_logger(name: str) -> Any:
    """rabbitflow's logger ``name``: structlog once configured, stdlib logging before."""
    return _Logger(name)


def renders_json() -> bool:
    """Whether :func:`configure_logging` chose JSON lines (False before it is called)."""
    return _renders_json


class AddWorker:
    """``worker`` (its index) and ``pid`` on every line of a ``--workers`` child, so that the
    lines of N workers mixed in one stream can be told apart."""

    __slots__ = ("_fields",)

    def __init__(self, index: int) -> None:
        self._fields = {"worker": index, "pid": os.getpid()}

    def __call__(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        for key, value in self._fields.items():
            event.setdefault(key, value)
        return event


def configure_logging(
    fmt: LogFormat = "auto", level: str = "info", *, worker: int | None = None
) -> None:
    """Configure structlog (and the stdlib loggers of aio-pika/aiormq) for a worker process.

    ``auto`` means console output on a terminal and JSON otherwise. Levels below ``level``
    cost one no-op call: the bound logger is built for the level once. ``worker`` is the
    index of a ``--workers`` child: its lines carry it, and the pid.
    """
    numeric = logging.getLevelNamesMapping()[level.upper()]
    global _renders_json
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    _renders_json = use_json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_delivery_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_secrets,
    ]
    if worker is not None:
        processors.insert(2, AddWorker(worker))
    if use_json:
        processors.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line: print() writes the line and its newline apart, so with an
        # unbuffered stderr (PYTHONUNBUFFERED, common in containers) the lines of --workers N
        # children sharing one output could interleave into lines that are not JSON.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiormq/aio-pika log through the stdlib; keep their warnings, drop their chatter. Their
    # records are rendered like ours, so that --log-format json prints nothing but JSON lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
        )
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])
    # The CLI silences the AMQP client (rabbitflow reports connection trouble itself, once);
    # at debug level its lines are shown too, rendered like ours.
    if numeric <= logging.DEBUG:
        client_handler = logging.StreamHandler(sys.stderr)
        client_handler.setFormatter(handler.formatter)
        client_handler.addFilter(_as_debug)
        for name in ("aio_pika", "aiormq"):
            client = logging.getLogger(name)
            client.handlers = [client_handler]
            client.setLevel(logging.DEBUG)
            client.propagate = False


def _as_debug(record: logging.LogRecord) -> bool:
    # The client's "error when creating transport" is a detail of rabbitflow's own warning
    # ("broker unreachable; retrying"): shown at debug level, as debug.
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True
