"""The AMQP operations of declaring: a channel that survives refusals, passive and active
declares, and the broker's refusals as rabbitflow errors naming the object.

Every object comes from :func:`rabbitflow.topology._derived.derive`; nothing here computes a
name or an argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection

from rabbitflow._border import refusal, reply_text
from rabbitflow._broker_version import BrokerVersion
from rabbitflow._duration import format_duration
from rabbitflow._logging import get_logger
from rabbitflow.errors import (
    AccessRefusedError,
    RabbitflowError,
    TopologyConflictError,
)
from rabbitflow.topology._derived import (
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
)

log = get_logger("rabbitflow.declare")

Target = AbstractConnection | AbstractChannel
Spec = ExchangeSpec | QueueSpec | BindingSpec
Kind = Literal["exchange", "queue", "binding"]

# "inequivalent arg 'x-message-ttl' for queue 'q' in vhost 'v': received '2000' but current
# is '1000'". A value is `none`, `'text'` (same type on both sides) or
# `the value 'text' of type 'long'` (types differ, or one side is missing).
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<argument>[^']*)' for (?P<kind>exchange|queue) '(?P<name>.*)' "
    r"in vhost '.*': received (?P<received>.*?) but current is (?P<current>.*)$",
    re.DOTALL,
)
_VALUE = re.compile(
    r"^(?:none|'(?P<plain>.*)'|the value '(?P<typed>.*)' of type '(?P<type>[\w-]+)')$"
)
_INTEGER_TYPES = frozenset(
    {"byte", "unsignedbyte", "short", "unsignedshort", "signedint", "unsignedint", "long"}
)
# Properties RabbitMQ compares on redeclaration that are not x-arguments.
_PROPERTIES = frozenset({"type", "durable", "auto_delete", "exclusive", "internal"})


@dataclass(frozen=True, slots=True)
class Declared:
    """One object as the CLI reports it: ``queue billing.order-created (quorum, ...)``."""

    kind: Kind
    name: str
    detail: str = ""

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.kind} {self.name}{detail}"


class ChannelSource:
    """A usable channel on demand; a fresh one after the broker closes it on an error.

    RabbitMQ answers a failed declare (404, 405, 406, 403) by closing the channel, so the
    next operation needs a new one. Only channels opened here are closed here."""

    __slots__ = ("_channel", "_owned", "_target")

    def __init__(self, target: Target) -> None:
        self._target = target
        self._owned = isinstance(target, AbstractConnection)
        self._channel: AbstractChannel | None = (
            None if isinstance(target, AbstractConnection) else target
        )

    async def get(self) -> aiormq.abc.AbstractChannel:
        """The underlying aiormq channel, reopened if the broker closed it."""
        if self._channel is None or (self._owned and self._channel.is_closed):
            assert isinstance(self._target, AbstractConnection)
            self._channel = await self._target.channel(publisher_confirms=False)
        elif self._channel.is_closed:
            await self._channel.reopen()
        return await self._channel.get_underlay_channel()

    async def version(self) -> BrokerVersion | None:
        """The version of the broker the channels are on."""
        channel = await self.get()
        return BrokerVersion.from_properties(channel.connection.server_properties)

    async def close(self) -> None:
        """Close the channel if this source opened it."""
        if self._owned and self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


async def exists(channels: ChannelSource, spec: ExchangeSpec | QueueSpec) -> bool:
    """Whether the object exists, by a passive declare (which never creates anything)."""
    try:
        await _passive(await channels.get(), spec)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    except aiormq.exceptions.ChannelLockedResource:
        # An exclusive queue owned by another connection (a running worker) exists.
        return True
    except aiormq.exceptions.AMQPError as exc:
        raise broker_error(exc, spec, "check") from None
    return True


async def visible(channels: ChannelSource, spec: ExchangeSpec | QueueSpec) -> bool | None:
    """:func:`exists`, or None when the broker refuses the user a look at the object.

    RabbitMQ checks the permission before the object, so a refusal says nothing about it."""
    try:
        return await exists(channels, spec)
    except AccessRefusedError:
        return None


async def apply(channels: ChannelSource, spec: Spec) -> None:
    """Declare one object (or bind), converting a refusal into a rabbitflow error."""
    try:
        await _active(await channels.get(), spec)
    except aiormq.exceptions.AMQPError as exc:
        error = broker_error(exc, spec, "declare")
        if not isinstance(spec, QueueSpec) or not isinstance(error, TopologyConflictError):
            raise error from None
        cost = _added_later(spec, error)
        if cost is None:
            raise error from None
        # RabbitMQ cannot add an argument to an existing queue, and refuses a declaration
        # that differs: a queue declared by an earlier rabbitflow is kept as it is.
        log.warning(
            f"queue {spec.name!r} was declared without {error.argument} (by an earlier "
            f"rabbitflow) and is kept as it is: {cost}",
            queue=spec.name,
            argument=error.argument,
        )
        arguments = {k: v for k, v in spec.arguments.items() if k != error.argument}
        await apply(channels, replace(spec, arguments=arguments))


# Arguments rabbitflow declares since a later release, by queue role: an existing queue that
# lacks one is accepted without it (what that costs, and the policy that adds it).
_ADDED_LATER: dict[tuple[str, str], str] = {
    ("dlq", "x-delivery-limit"): (
        "on RabbitMQ 4 its messages are deleted after 20 reads by `dlq list`; recreate it "
        "when empty"
    ),
    ("retry", "x-delivery-limit"): (
        "on RabbitMQ 4 a copy read 20 times by `retries list` goes back to its queue early"
    ),
    ("work", "x-dead-letter-strategy"): (
        "what the broker dead-letters while the DLQ is missing is dropped; apply a policy "
        "with dead-letter-strategy = at-least-once and overflow = reject-publish "
        "(docs/recoverability.md), or recreate the queue"
    ),
    ("work", "x-overflow"): (
        "apply a policy with overflow = reject-publish (docs/recoverability.md), or recreate "
        "the queue"
    ),
}


def _added_later(spec: QueueSpec, error: TopologyConflictError) -> str | None:
    if error.broker_value is not None:
        return None
    return _ADDED_LATER.get((spec.role, error.argument))


async def _active(channel: aiormq.abc.AbstractChannel, spec: Spec) -> None:
    if isinstance(spec, ExchangeSpec):
        await channel.exchange_declare(
            spec.name,
            exchange_type=spec.type,
            durable=spec.durable,
            auto_delete=spec.auto_delete,
            internal=spec.internal,
            arguments=spec.arguments,
        )
    elif isinstance(spec, QueueSpec):
        await channel.queue_declare(
            spec.name,
            durable=spec.durable,
            exclusive=spec.exclusive,
            auto_delete=spec.auto_delete,
            arguments=spec.arguments,
        )
    elif spec.destination_type == "exchange":
        await channel.exchange_bind(
            spec.destination, spec.source, spec.routing_key, arguments=spec.arguments
        )
    else:
        await channel.queue_bind(
            spec.destination, spec.source, spec.routing_key, arguments=spec.arguments
        )


async def _passive(channel: aiormq.abc.AbstractChannel, spec: ExchangeSpec | QueueSpec) -> None:
    if isinstance(spec, ExchangeSpec):
        await channel.exchange_declare(spec.name, passive=True)
    else:
        await channel.queue_declare(spec.name, passive=True)


def broker_error(exc: aiormq.exceptions.AMQPError, spec: Spec, verb: str) -> RabbitflowError:
    """The rabbitflow error for a broker refusal of ``verb`` on ``spec``."""
    text = reply_text(exc)
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed) and not isinstance(
        spec, BindingSpec
    ):
        conflict = parse_conflict(text, spec)
        if conflict is not None:
            return conflict
    return refusal(exc, f"{verb} {_label(spec)}", permission=_permission(spec))


def parse_conflict(text: str, spec: ExchangeSpec | QueueSpec) -> TopologyConflictError | None:
    """Turn a PRECONDITION_FAILED "inequivalent arg" reply into a conflict naming both values.

    The file's value is taken from ``spec`` (what we sent), the broker's from the reply."""
    match = _INEQUIVALENT.search(text)
    if match is None:
        return None
    argument = match["argument"]
    file_value = file_value_of(spec, argument)
    broker_value = _broker_value(match["current"], file_value)
    return TopologyConflictError(kind_of(spec), spec.name, argument, broker_value, file_value)


def file_value_of(spec: ExchangeSpec | QueueSpec, argument: str) -> object:
    """What the file asks for: an x-argument, a property such as ``durable``, or None."""
    if argument in spec.arguments:
        return spec.arguments[argument]
    if argument in _PROPERTIES:
        return getattr(spec, argument, None)
    return None


def _broker_value(text: str, like: object) -> object:
    match = _VALUE.match(text.strip())
    if match is None:
        return text
    if match["plain"] is None and match["typed"] is None:
        return None
    raw: str = match["plain"] if match["plain"] is not None else match["typed"]
    kind = match["type"]
    if kind == "bool" or (kind is None and isinstance(like, bool)):
        return raw == "true"
    if kind in _INTEGER_TYPES or (kind is None and isinstance(like, int)):
        return _int_or_text(raw)
    return raw


def _int_or_text(raw: str) -> int | str:
    try:
        return int(raw)
    except ValueError:
        return raw


def kind_of(spec: Spec) -> Kind:
    """``exchange``, ``queue`` or ``binding``."""
    if isinstance(spec, ExchangeSpec):
        return "exchange"
    return "queue" if isinstance(spec, QueueSpec) else "binding"


def _label(spec: Spec) -> str:
    if isinstance(spec, BindingSpec):
        return f"binding {binding_name(spec)!r}"
    return f"{kind_of(spec)} {spec.name!r}"


def _permission(spec: Spec) -> str:
    # Declaring needs "configure" on the object; binding needs "write" on the destination
    # and "read" on the source exchange (RabbitMQ access control).
    if isinstance(spec, BindingSpec):
        return (
            f"the user lacks write permission on {spec.destination!r} "
            f"or read permission on {spec.source!r} in this vhost"
        )
    if isinstance(spec, QueueSpec) and "x-dead-letter-exchange" in spec.arguments:
        # A queue that dead-letters also needs read on itself and write on its dead-letter
        # exchange: RabbitMQ checks both when the queue is declared.
        return (
            f"the user lacks configure permission on {spec.name!r}, or read permission on it "
            f"or write permission on {spec.arguments['x-dead-letter-exchange'] or 'amq.default'!r}"
            " in this vhost"
        )
    return f"the user lacks configure permission on {spec.name!r} in this vhost"


def binding_name(spec: BindingSpec) -> str:
    """``orders -> billing.order-created``."""
    return f"{spec.source} -> {spec.destination}"


def binding_detail(spec: BindingSpec) -> str:
    """The routing key, or the header match of a headers binding."""
    if spec.arguments:
        return ", ".join(f"{key}={value}" for key, value in spec.arguments.items())
    return f"routing key {spec.routing_key!r}" if spec.routing_key else ""


def describe(spec: Spec) -> Declared:
    """A one-line description of an object for people."""
    if isinstance(spec, BindingSpec):
        return Declared("binding", binding_name(spec), binding_detail(spec))
    if isinstance(spec, ExchangeSpec):
        return Declared("exchange", spec.name, _exchange_detail(spec))
    return Declared("queue", spec.name, _queue_detail(spec))


def _exchange_detail(spec: ExchangeSpec) -> str:
    flags = [spec.type]
    flags += [] if spec.durable else ["transient"]
    flags += ["auto-delete"] if spec.auto_delete else []
    flags += ["internal"] if spec.internal else []
    return ", ".join(flags)


def _queue_detail(spec: QueueSpec) -> str:
    arguments: dict[str, Any] = spec.arguments
    parts = [str(arguments.get("x-queue-type", "classic"))]
    if spec.role == "retry":
        ttl = format_duration(int(arguments["x-message-ttl"]))
        parts.append(f"retry tier of {spec.owner}, TTL {ttl}")
    elif spec.role == "dlq":
        parts.append(f"dead-letter queue of {spec.owner}")
    elif arguments.get("x-dead-letter-exchange"):
        parts.append(f"dead-letters to {arguments['x-dead-letter-exchange']}")
    parts += ["exclusive"] if spec.exclusive else []
    if "x-queue-leader-locator" in arguments:
        parts.append(f"leader {arguments['x-queue-leader-locator']}")
    replicas = arguments.get("x-quorum-initial-group-size", arguments.get("x-initial-cluster-size"))
    if replicas is not None:
        parts.append(f"{replicas} replicas")
    return ", ".join(parts)
