"""Everything a topology declares on the broker, derived in one place.

``derive()`` is the single source of what exists: ``declare``, ``plan``, ``export`` and the
worker (which needs the retry tier and DLQ names) all read its result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rabbitflow._broker_version import BrokerVersion
from rabbitflow._duration import format_duration
from rabbitflow.topology._model import QueueConfig, Topology

QueueRole = Literal["work", "retry", "dlq"]
# The largest x-delivery-limit (a signed 32-bit int): no limit in practice, on every version.
# RabbitMQ 4.0 gives quorum queues a default limit of 20 (a message returned more often is
# dropped), and -1 turns it off there; 3.10 accepts -1 too but then drops a message on its
# first return, so only a huge limit means "unlimited" on both.
UNLIMITED_DELIVERIES = 2**31 - 1


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: str
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    role: QueueRole
    owner: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BindingSpec:
    source: str
    destination: str
    destination_type: Literal["queue", "exchange"]
    routing_key: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueRoutes:
    """Where rabbitflow republishes a failed message of one work queue."""

    queue: str
    tiers: dict[int, str]
    dead_letter_exchange: str | None

    def tier_at_least(self, delay_ms: int) -> tuple[int, str]:
        """The smallest tier whose delay is >= ``delay_ms``, else the largest tier."""
        for delay in sorted(self.tiers):
            if delay >= delay_ms:
                return delay, self.tiers[delay]
        largest = max(self.tiers)
        return largest, self.tiers[largest]

    def tier_at_most(self, delay_ms: int) -> tuple[int, str]:
        """The largest tier whose delay is <= ``delay_ms``, else the smallest tier."""
        fitting = [delay for delay in self.tiers if delay <= delay_ms]
        delay = max(fitting) if fitting else min(self.tiers)
        return delay, self.tiers[delay]


@dataclass(frozen=True, slots=True)
class Declarations:
    """Broker objects in dependency order: exchanges, exchange bindings, queues, queue bindings."""

    exchanges: tuple[ExchangeSpec, ...]
    exchange_bindings: tuple[BindingSpec, ...]
    queues: tuple[QueueSpec, ...]
    queue_bindings: tuple[BindingSpec, ...]
    routes: dict[str, QueueRoutes]


def tier_name(queue: str, delay_ms: int) -> str:
    """``billing.order-created.retry.30s``."""
    return f"{queue}.retry.{format_duration(delay_ms)}"


# ``rabbitflow topology migrate`` holds a queue's messages in ``<queue>.migrating`` while it
# re-creates the queue; consumers that see the queue gone wait for it while that one exists.
MIGRATING_SUFFIX = ".migrating"


def migrating_name(queue: str) -> str:
    """``billing.order-created.migrating``."""
    return queue + MIGRATING_SUFFIX


def dlq_name(queue: str) -> str:
    """``billing.order-created.dlq``."""
    return f"{queue}.dlq"


def derive(topology: Topology) -> Declarations:
    """Compute every exchange, queue and binding the topology needs, generated ones included."""
    exchanges = [
        ExchangeSpec(name, ex.type, ex.durable, ex.auto_delete, ex.internal, dict(ex.arguments))
        for name, ex in topology.exchanges.items()
    ]
    exchange_bindings = [
        BindingSpec(b.exchange, name, "exchange", b.routing_key, dict(b.arguments))
        for name, ex in topology.exchanges.items()
        for b in ex.bindings
    ]
    queues: list[QueueSpec] = []
    queue_bindings: list[BindingSpec] = []
    routes: dict[str, QueueRoutes] = {}
    dlx = topology.dead_letter_exchange
    for config in topology.queues.values():
        queues.append(_work_queue(config, dlx))
        queue_bindings.extend(
            BindingSpec(b.exchange, config.name, "queue", b.routing_key, dict(b.arguments))
            for b in config.bindings
        )
        tiers = {delay: tier_name(config.name, delay) for delay in config.retry.delays_ms}
        if config.queue_type == "stream":
            tiers = {}  # a tier would append the retry to the stream: attempts run in place
        if config.retry.enabled and tiers:
            queues.extend(_tier_queue(config, delay, name) for delay, name in tiers.items())
        if config.dead_letter:
            queues.append(
                QueueSpec(
                    dlq_name(config.name), "dlq", config.name, arguments=_dlq_arguments(config)
                )
            )
            queue_bindings.append(BindingSpec(dlx, dlq_name(config.name), "queue", config.name))
        routes[config.name] = QueueRoutes(
            config.name,
            tiers if config.retry.enabled else {},
            dlx if config.dead_letter else None,
        )
    if any(config.dead_letter for config in topology.queues.values()):
        exchanges.append(ExchangeSpec(dlx, "topic"))
    return Declarations(
        tuple(exchanges), tuple(exchange_bindings), tuple(queues), tuple(queue_bindings), routes
    )


def _work_queue(config: QueueConfig, dlx: str) -> QueueSpec:
    arguments: dict[str, Any] = {"x-queue-type": config.queue_type}
    if config.dead_letter and config.queue_type != "stream":
        # Messages the broker dead-letters by itself (TTL, overflow, quorum delivery-limit)
        # take the same route as the ones rabbitflow dead-letters.
        arguments["x-dead-letter-exchange"] = dlx
        arguments["x-dead-letter-routing-key"] = config.name
    if config.queue_type == "quorum":
        # A message whose handler kills the process is redelivered with a growing
        # x-delivery-count; past the limit the broker dead-letters it (reason delivery_limit).
        arguments["x-delivery-limit"] = config.crash_limit
        if config.dead_letter and config.arguments.get("x-overflow", "reject-publish") == (
            "reject-publish"
        ):
            # Quorum queues dead-letter at-most-once by default: a message the broker
            # dead-letters (delivery limit, TTL) while its DLQ is missing is dropped. With
            # at-least-once it stays in the queue until the DLQ confirms it, which RabbitMQ
            # allows only with reject-publish overflow (a full queue refuses new messages
            # instead of dead-lettering its head).
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
    if config.single_active_consumer:
        arguments["x-single-active-consumer"] = True
    if config.consumer_timeout_ms is not None:
        arguments["x-consumer-timeout"] = config.consumer_timeout_ms
    arguments.update(_placement(config, config.queue_type))
    arguments.update(config.arguments)
    return QueueSpec(
        config.name,
        "work",
        config.name,
        config.durable,
        config.exclusive,
        config.auto_delete,
        arguments,
    )


def _side_queue_type(config: QueueConfig) -> dict[str, Any]:
    # Retry tiers and DLQs of a stream are quorum queues: streams cannot expire or dead-letter.
    side = "classic" if config.queue_type == "classic" else "quorum"
    return {"x-queue-type": side, **_placement(config, side)}


def _placement(config: QueueConfig, queue_type: str) -> dict[str, Any]:
    # Where a replicated queue's leader goes (client-local: the declaring connection's node;
    # balanced: the node with the fewest leaders) and on how many nodes it starts.
    arguments: dict[str, Any] = {}
    if queue_type == "classic":
        return arguments
    if config.leader_locator is not None:
        arguments["x-queue-leader-locator"] = config.leader_locator
    if config.initial_group_size is not None:
        size_key = (
            "x-initial-cluster-size" if queue_type == "stream" else "x-quorum-initial-group-size"
        )
        arguments[size_key] = config.initial_group_size
    return arguments


def _dlq_arguments(config: QueueConfig) -> dict[str, Any]:
    arguments = _side_queue_type(config)
    if arguments["x-queue-type"] == "quorum":
        # `dlq list` reads a DLQ by taking messages and returning them; each return counts
        # as a delivery, and a DLQ must never lose a message to a delivery limit.
        arguments["x-delivery-limit"] = UNLIMITED_DELIVERIES
    return arguments


def _tier_queue(config: QueueConfig, delay_ms: int, name: str) -> QueueSpec:
    arguments = _side_queue_type(config)
    # RabbitMQ expires messages only at the head of a queue, so a tier holds one delay only:
    # every message in it expires in arrival order and dead-letters through the default
    # exchange straight back to the failing queue, never to its siblings on the same exchange.
    arguments.update(
        {
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": config.name,
        }
    )
    if arguments["x-queue-type"] == "quorum":
        # Quorum queues dead-letter at-most-once unless told otherwise; at-least-once needs
        # reject-publish overflow (RabbitMQ 3.10+).
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
        # Nothing consumes a tier, but `retries list` and the console read it by taking
        # messages and giving them back; RabbitMQ 4 counts each return against a default
        # limit of 20 and would dead-letter the copy back to its queue early.
        arguments["x-delivery-limit"] = UNLIMITED_DELIVERIES
    return QueueSpec(name, "retry", config.name, arguments=arguments)


def derived_for(declarations: Declarations, queue: str) -> Declarations:
    """The objects rabbitflow generates for ``queue``: its tiers, the DLX, its DLQ and binding.

    What a worker declares again when a retry or dead-letter copy finds them missing."""
    routes = declarations.routes[queue]
    side = tuple(q for q in declarations.queues if q.owner == queue and q.role != "work")
    names = {q.name for q in side}
    return Declarations(
        tuple(e for e in declarations.exchanges if e.name == routes.dead_letter_exchange),
        (),
        side,
        tuple(b for b in declarations.queue_bindings if b.destination in names),
        {queue: routes},
    )


def for_broker(declarations: Declarations, version: BrokerVersion | None) -> Declarations:
    """``declarations`` as the broker of ``version`` accepts them; unchanged when unknown.

    RabbitMQ 4.3 refuses ``x-consumer-timeout`` on classic queues and streams (it never
    times their consumers out), so a work queue's ``consumer_timeout`` is left out there:
    declaring it would fail the whole declare."""
    if version is None:
        return declarations
    queues = tuple(_accepted(spec, version) for spec in declarations.queues)
    return replace(declarations, queues=queues)


def _accepted(spec: QueueSpec, version: BrokerVersion) -> QueueSpec:
    queue_type = str(spec.arguments.get("x-queue-type", "classic"))
    if "x-consumer-timeout" in spec.arguments and not version.accepts_consumer_timeout(queue_type):
        arguments = {k: v for k, v in spec.arguments.items() if k != "x-consumer-timeout"}
        return replace(spec, arguments=arguments)
    return spec


def consumer_timeout_use(spec: QueueSpec, version: BrokerVersion) -> str | None:
    """How a work queue's ``consumer_timeout`` takes effect on ``version``, for people (plan,
    validate --broker-version); None when the queue has none."""
    limit = spec.arguments.get("x-consumer-timeout")
    if limit is None:
        return None
    queue_type = str(spec.arguments.get("x-queue-type", "classic"))
    label = format_duration(int(limit))
    if not version.consumer_timeout_applies(queue_type):
        return (
            f"consumer_timeout {label}: not declared, RabbitMQ {version.major}.{version.minor} "
            f"never times out consumers of {queue_type} queues (and refuses x-consumer-timeout)"
        )
    if not version.enforces_queue_consumer_timeout:
        return (
            f"consumer_timeout {label}: declared as x-consumer-timeout but not enforced before "
            "RabbitMQ 3.12: only the broker-wide consumer_timeout applies (rabbitmq.conf)"
        )
    if version.consumer_timeout_on_consume(queue_type):
        return (
            f"consumer_timeout {label}: queue argument x-consumer-timeout and basic.consume "
            "argument (applies to a queue declared without it too); a timed-out consumer "
            "gets basic.cancel and rabbitflow consumes again"
        )
    return (
        f"consumer_timeout {label}: queue argument x-consumer-timeout, checked once per "
        "channel tick (60 s by default); a timed-out delivery closes the channel"
    )
