"""The pydantic schema of ``topology.toml``, exactly as users write it (before defaults apply).

The models are strict: a TOML value must have the key's type, nothing is converted. A string
is never a boolean or a number and a float never an integer, so ``dead_letter = "false"`` is
an error instead of a true value (``_reading`` words each error with the line to write)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)

from rabbitflow._duration import DURATION_HINT, parse_duration, parse_size
from rabbitflow.types import ExchangeType, QueueType

Loc = tuple[str | int, ...]
LeaderLocator = Literal["client-local", "balanced"]
# Where a stream consumer starts the first time: a position, an offset, or a point in time.
StreamOffset = Literal["first", "last", "next"] | int | datetime.datetime
_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class Invalid(ValueError):
    """Raised by a validator of the schema: what is wrong, and the fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class _DurationMarker:
    """Marks a duration field, for the warning about bare integers under a second."""


DURATION_MARKER = _DurationMarker()


def _duration(value: object) -> int:
    # parse_duration takes integers and strings; a float would be truncated by int().
    if isinstance(value, bool | float):
        raise ValueError(f"{shown(value)} is not a duration; {DURATION_HINT}")
    return parse_duration(value)


def _size(value: object) -> int:
    if isinstance(value, float):
        raise ValueError(f'{shown(value)} is a float; write bytes as an integer or e.g. "16MiB"')
    return parse_size(value)


def _stream_offset(value: object) -> StreamOffset:
    # One validator rather than a union, so that a wrong value is one error, not one per member.
    if isinstance(value, str) and value in ("first", "last", "next"):
        return value  # type: ignore[return-value]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, datetime.datetime):
        return value
    raise Invalid(
        f"{shown(value)} is not a stream offset",
        'write "first", "last", "next", an offset (an integer >= 0) or a date-time',
    )


Duration = Annotated[int, BeforeValidator(_duration), DURATION_MARKER]
Size = Annotated[int, BeforeValidator(_size)]
Offset = Annotated[StreamOffset, PlainValidator(_stream_offset)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BrokerTable(_Table):
    """``[broker]``: where to connect when neither ``--url`` nor ``RABBITFLOW_URL`` is given.

    ``url`` names one node, ``urls`` the nodes of one cluster (not both)."""

    url: str | None = None
    urls: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> BrokerTable:
        if self.url is not None and self.urls is not None:
            raise ValueError("set url (one node) or urls (a cluster), not both")
        return self

    @property
    def all_urls(self) -> list[str] | None:
        """``urls``, else ``[url]``, else None."""
        if self.urls is not None:
            return list(self.urls)
        return None if self.url is None else [self.url]


class DeadLetterTable(_Table):
    """``[dead_letter]``: the topic exchange that receives every dead-lettered message."""

    exchange: str = "dlx"


class BindingTable(_Table):
    """A binding from an exchange: ``{ exchange = "orders", routing_key = "order.*" }``."""

    exchange: str
    routing_key: str = ""
    arguments: dict[str, Any] = Field(default_factory=dict)


class RetryTable(_Table):
    """``retry = { delays = [...], max_attempts = N, max_defer = "1d" }``; ``retry = false``
    disables retries. ``max_defer`` bounds how long a message may wait for its
    ``rabbitflow-not-before`` (or a ``Retry(delay)``) before it is dead-lettered instead."""

    delays: list[Duration] = Field(min_length=1)
    max_attempts: int | None = Field(default=None, ge=1)
    max_defer: Duration | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.delays)


def _retry_switch(value: object) -> object:
    # ``retry = false`` is stored as an empty policy so that a single type reaches validation.
    if value is False:
        return RetryTable.model_construct(delays=[], max_attempts=None, max_defer=None)
    if value is True:
        raise ValueError('retry = true is not a policy; write retry = { delays = ["1s", "10s"] }')
    if isinstance(value, str) and value.strip().lower() == "false":
        raise Invalid(f"{shown(value)} is a string", "write retry = false, without quotes")
    return value


RetryField = Annotated[RetryTable | None, BeforeValidator(_retry_switch)]


class CircuitBreakerTable(_Table):
    """``circuit_breaker = { failure_ratio = 0.5, window = "30s", min_calls = 20 }``.

    When at least ``min_calls`` handler runs in the last ``window`` failed in a proportion of
    ``failure_ratio`` or more, the consumer pauses for ``cooldown``: its backlog stays in the
    queue instead of cycling through the retry tiers."""

    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    window: Duration = 30_000
    min_calls: int = Field(default=20, ge=1)
    cooldown: Duration = 30_000


class ExchangeTable(_Table):
    """``[exchanges.NAME]``."""

    type: ExchangeType
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = Field(default_factory=dict)
    bindings: list[BindingTable] = Field(default_factory=list)


class DefaultsTable(_Table):
    """``[defaults]``: applied to every queue that does not set the key itself."""

    queue_type: QueueType = "quorum"
    prefetch: int = Field(default=32, ge=1, le=65535)
    concurrency: int | None = Field(default=None, ge=1)
    timeout: Duration | None = None
    retry: RetryField = RetryTable(delays=[1_000, 10_000, 60_000])
    dead_letter: bool = True
    crash_limit: int = Field(default=10, ge=1)
    max_body_size: Size = 16 * 1024 * 1024
    immediate_retries: int = Field(default=0, ge=0, le=10)
    circuit_breaker: CircuitBreakerTable | None = None
    consumer_timeout: Duration | None = None
    leader_locator: LeaderLocator | None = None
    initial_group_size: int | None = Field(default=None, ge=1)

    @field_validator("prefetch", mode="before")
    @classmethod
    def _refuse_unlimited(cls, value: object) -> object:
        return _refuse_zero_prefetch(value)


def _refuse_zero_prefetch(value: object) -> object:
    if type(value) is int and value == 0:
        raise ValueError(
            "prefetch 0 means unlimited, which lets the broker push the whole queue into memory; "
            "set a positive prefetch (e.g. 32)"
        )
    return value


class QueueTable(_Table):
    """``[queues.NAME]``; unset keys inherit from ``[defaults]``."""

    queue_type: QueueType | None = None
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    bindings: list[BindingTable] = Field(default_factory=list)
    prefetch: int | None = Field(default=None, ge=1, le=65535)
    concurrency: int | None = Field(default=None, ge=1)
    timeout: Duration | None = None
    retry: RetryField = None
    dead_letter: bool | None = None
    crash_limit: int | None = Field(default=None, ge=1)
    max_body_size: Size | None = None
    immediate_retries: int | None = Field(default=None, ge=0, le=10)
    circuit_breaker: CircuitBreakerTable | None = None
    # Quorum placement, applied to the queue, its retry tiers and its DLQ alike.
    leader_locator: LeaderLocator | None = None
    initial_group_size: int | None = Field(default=None, ge=1)
    retry_on: list[str] = Field(default_factory=list)
    dead_letter_on: list[str] = Field(default_factory=list)
    single_active_consumer: bool = False
    consumer_timeout: Duration | None = None
    stream_offset: Offset | None = None
    idempotent: bool = False  # handle each message_id once (needs App(idempotency=...))
    track: bool = False  # record each message_id's job status (needs App(jobs=...))
    arguments: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prefetch", mode="before")
    @classmethod
    def _refuse_unlimited(cls, value: object) -> object:
        return _refuse_zero_prefetch(value)


class TopologyFile(_Table):
    """The whole file."""

    broker: BrokerTable = BrokerTable()
    defaults: DefaultsTable = DefaultsTable()
    dead_letter: DeadLetterTable = DeadLetterTable()
    exchanges: dict[str, ExchangeTable] = Field(default_factory=dict)
    queues: dict[str, QueueTable] = Field(default_factory=dict)


# The keys a queue inherits from [defaults] when it does not set them.
INHERITED = frozenset(DefaultsTable.model_fields)


def format_path(loc: Sequence[int | str]) -> str:
    """``("queues", "billing.order-created", "retry", "delays", 1)`` → TOML-style path."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            bare = part and _BARE_KEY_CHARS.issuperset(part)
            key = part if bare else '"' + part.replace('"', '\\"') + '"'
            text += f".{key}" if text else key
    return text


def shown(value: object) -> str:
    """``value`` as the file has it: ``'yes'``, ``true``, ``50.0``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(shown(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {shown(v)}" for k, v in value.items()) + " }"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: a bool is an int in Python
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def a_kind(value: object) -> str:
    """The TOML type of ``value`` with its article: ``a string``, ``an integer``..."""
    return next((name for kind, name in _KINDS if isinstance(value, kind)), "a date or time")
