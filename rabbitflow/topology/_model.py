"""The resolved topology: the file with ``[defaults]`` applied, as the rest of rabbitflow reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rabbitflow.errors import Problem
from rabbitflow.topology._schema import (
    BindingTable,
    CircuitBreakerTable,
    DefaultsTable,
    ExchangeTable,
    QueueTable,
    StreamOffset,
    TopologyFile,
)
from rabbitflow.types import QueueType


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Delays in ms between attempts (the last repeats) and the total number of handler runs."""

    delays_ms: tuple[int, ...]
    max_attempts: int
    max_defer_ms: int = 24 * 60 * 60 * 1000

    @property
    def enabled(self) -> bool:
        return bool(self.delays_ms) and self.max_attempts > 1

    def delay_for(self, attempt: int) -> int:
        """Delay before attempt ``attempt`` (n >= 2): ``delays[min(n-2, len-1)]``."""
        return self.delays_ms[min(attempt - 2, len(self.delays_ms) - 1)]


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """One work queue with every setting resolved."""

    name: str
    queue_type: QueueType
    durable: bool
    exclusive: bool
    auto_delete: bool
    bindings: tuple[BindingTable, ...]
    prefetch: int
    concurrency: int | None
    timeout_ms: int | None
    retry: RetryPolicy
    dead_letter: bool
    crash_limit: int
    max_body_size: int
    arguments: dict[str, Any] = field(default_factory=dict)
    immediate_retries: int = 0
    circuit_breaker: CircuitBreakerTable | None = None
    retry_on: tuple[str, ...] = ()
    dead_letter_on: tuple[str, ...] = ()
    single_active_consumer: bool = False
    consumer_timeout_ms: int | None = None
    stream_offset: StreamOffset = "next"
    idempotent: bool = False
    track: bool = False
    leader_locator: str | None = None
    initial_group_size: int | None = None

    @property
    def max_in_flight(self) -> int:
        """How many handlers may run at once: ``concurrency`` capped by ``prefetch``."""
        return min(self.concurrency or self.prefetch, self.prefetch)


@dataclass(frozen=True, slots=True)
class Topology:
    """A validated topology file."""

    source: str
    broker_url: str | None
    dead_letter_exchange: str
    exchanges: dict[str, ExchangeTable]
    queues: dict[str, QueueConfig]
    broker_urls: tuple[str, ...] = ()
    # Not errors, but most likely mistakes (``timeout = 30`` is 30 ms): the commands print
    # them and ``App.load_topology`` logs them.
    warnings: tuple[Problem, ...] = ()

    @classmethod
    def from_file(cls, source: str, parsed: TopologyFile) -> Topology:
        queues = {name: _resolve(name, table, parsed) for name, table in parsed.queues.items()}
        urls = parsed.broker.all_urls or []
        return cls(
            source=source,
            broker_url=urls[0] if urls else None,
            broker_urls=tuple(urls),
            dead_letter_exchange=parsed.dead_letter.exchange,
            exchanges=dict(parsed.exchanges),
            queues=queues,
        )


def _resolve(name: str, table: QueueTable, parsed: TopologyFile) -> QueueConfig:
    defaults = parsed.defaults
    retry = table.retry if table.retry is not None else defaults.retry
    delays = tuple(retry.delays) if retry is not None else ()
    max_attempts = (retry.max_attempts if retry is not None else None) or len(delays) + 1
    queue_type = table.queue_type or defaults.queue_type
    return QueueConfig(
        name=name,
        queue_type=queue_type,
        durable=table.durable,
        exclusive=table.exclusive,
        auto_delete=table.auto_delete,
        bindings=tuple(table.bindings),
        prefetch=table.prefetch or defaults.prefetch,
        concurrency=table.concurrency or defaults.concurrency,
        timeout_ms=table.timeout if table.timeout is not None else defaults.timeout,
        retry=RetryPolicy(
            delays,
            max_attempts if delays else 1,
            *(() if retry is None or retry.max_defer is None else (retry.max_defer,)),
        ),
        dead_letter=table.dead_letter if table.dead_letter is not None else defaults.dead_letter,
        crash_limit=table.crash_limit or defaults.crash_limit,
        max_body_size=table.max_body_size or defaults.max_body_size,
        arguments=dict(table.arguments),
        immediate_retries=_immediate_retries(table, defaults, queue_type, max_attempts),
        circuit_breaker=table.circuit_breaker or defaults.circuit_breaker,
        retry_on=tuple(table.retry_on),
        dead_letter_on=tuple(table.dead_letter_on),
        single_active_consumer=table.single_active_consumer,
        stream_offset=table.stream_offset if table.stream_offset is not None else "next",
        consumer_timeout_ms=(
            table.consumer_timeout
            if table.consumer_timeout is not None
            else defaults.consumer_timeout
        ),
        idempotent=table.idempotent,
        track=table.track,
        leader_locator=table.leader_locator or defaults.leader_locator,
        initial_group_size=table.initial_group_size or defaults.initial_group_size,
    )


def _immediate_retries(
    table: QueueTable, defaults: DefaultsTable, queue_type: QueueType, max_attempts: int
) -> int:
    own = table.immediate_retries
    configured = own if own is not None else defaults.immediate_retries
    if queue_type != "stream":
        return configured
    # A stream keeps every message: a retry republished to it would be appended (and seen by
    # every other consumer of the stream). A stream handler's attempts all run in place,
    # then the message goes to the DLQ.
    return max(configured, max_attempts - 1)
