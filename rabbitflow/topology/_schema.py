"""The pydantic schema of ``topology.toml``, exactly as users write it (before defaults apply)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from rabbitflow._duration import parse_duration, parse_size
from rabbitflow.types import ExchangeType, QueueType

LeaderLocator = Literal["client-local", "balanced"]
Duration = Annotated[int, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
# Where a stream consumer starts the first time: a position, an offset, or a point in time.
StreamOffset = Literal["first", "last", "next"] | Annotated[int, Field(ge=0)] | datetime


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


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
    if value == 0:
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
    stream_offset: StreamOffset | None = None
    idempotent: bool = False  # handle each message_id once (needs App(idempotency=...))
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
