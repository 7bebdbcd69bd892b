"""The one border where aiormq and aio-pika errors become rabbitflow errors.

Like Dramatiq's RabbitMQ broker, each broker call that can fail is wrapped here and
re-raised ``from None``: a user catches :class:`rabbitflow.errors.BrokerError` or
:class:`rabbitflow.errors.PublishError` and never needs to import aiormq.

How RabbitMQ reports a failure decides which error it becomes:

- a refused operation closes the *channel* with a reply code (403 ACCESS_REFUSED, 404
  NOT_FOUND, 405 RESOURCE_LOCKED, 406 PRECONDITION_FAILED); the connection survives;
- a publish in confirm mode is answered with ``basic.ack`` or ``basic.nack`` (a nack: a queue
  refused it, e.g. ``x-overflow = reject-publish`` on a full queue, or a quorum queue without
  a quorum); a mandatory publish that no queue takes comes back first as ``basic.return``;
- a lost connection fails every call in flight.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import aiormq

from rabbitflow.errors import (
    AccessRefusedError,
    BrokerError,
    PublishError,
    RabbitflowError,
    UnroutableError,
)

# What a broker call can raise once the connection or channel is gone: aiormq's AMQP errors,
# socket errors, and aiormq's RuntimeError("... closed") for a call on a closed channel.
LOST = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


def reason(exc: BaseException) -> str:
    """One line saying why a broker call failed, for an error message or a log line."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.replace("\n", " ")


def reply_text(exc: BaseException) -> str:
    """The broker's reply text of a refusal (``NOT_FOUND - no queue 'q' in vhost '/'``).

    aiormq puts it first in the exception's arguments; its ``str()`` is a repr around it."""
    if exc.args:
        return str(exc.args[0]).replace("\n", " ")
    return reason(exc)


def broker_call(doing: str, *, missing: RabbitflowError | None = None) -> BrokerCall:
    """Run broker calls (``with`` or ``async with``): a refusal or a lost connection raises a
    ``BrokerError`` naming ``doing``.

    ``missing`` is raised instead when the broker answers 404 NOT_FOUND (a passive declare
    of a queue that does not exist)."""
    return BrokerCall(doing, missing)


class BrokerCall:
    """The context manager of :func:`broker_call`; converts the error on the way out."""

    __slots__ = ("doing", "missing")

    def __init__(self, doing: str, missing: RabbitflowError | None) -> None:
        self.doing = doing
        self.missing = missing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> Literal[False]:
        if exc is not None:
            self._convert(exc)
        return False

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: object, exc: BaseException | None, tb: object
    ) -> Literal[False]:
        return self.__exit__(kind, exc, tb)

    def _convert(self, exc: BaseException) -> None:
        doing = self.doing
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity) and self.missing is not None:
            raise self.missing from None
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            why = reason(exc)
            message = f"{doing}: access refused: {why}"
            raise AccessRefusedError(message, doing=doing, reason=why) from None
        if isinstance(exc, aiormq.exceptions.AMQPError | ConnectionError):
            why = reason(exc)
            raise BrokerError(f"{doing}: {why}", doing=doing, reason=why) from None


def refusal(exc: aiormq.exceptions.AMQPError, doing: str, *, permission: str) -> BrokerError:
    """The rabbitflow error for the broker's refusal to ``doing`` (``declare queue 'q'``);
    ``permission`` names the permission a 403 asks for."""
    text = reply_text(exc)
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return AccessRefusedError(f"cannot {doing}: {permission} ({text})")
    if isinstance(exc, aiormq.exceptions.ChannelLockedResource):
        # 405 RESOURCE_LOCKED is RabbitMQ's answer about an exclusive queue: another
        # connection owns it, or it exists with the other exclusive flag.
        return BrokerError(
            f"cannot {doing}: it is exclusive to another connection, "
            f"or exists with another exclusive flag ({text})"
        )
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError):
        return BrokerError(f"the connection closed while trying to {doing}: {text}")
    return BrokerError(f"cannot {doing}: {text}")


def publish_error(
    exc: BaseException, exchange: str, routing_key: str, *, nacked: str = ""
) -> PublishError:
    """The rabbitflow error for a publish that the broker did not confirm (``nacked``: the
    reason given for a refusal, :data:`NACKED` by default)."""
    if isinstance(exc, aiormq.exceptions.PublishError):
        # basic.return of a mandatory publish: no queue is bound for the routing key (or the
        # queue is gone). RabbitMQ confirms returned messages too, so this comes first.
        return UnroutableError(exchange, routing_key)
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        # 404: the exchange does not exist; the broker closed the channel.
        detail = exc.args[-1] if exc.args else repr(exc)
        return PublishError(exchange, routing_key, f"not found: {detail}", missing=True)
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return PublishError(exchange, routing_key, nacked or NACKED)
    if isinstance(exc, asyncio.TimeoutError):
        return no_confirm(exchange, routing_key)
    return unavailable(exc, exchange, routing_key)


def no_confirm(exchange: str, routing_key: str) -> PublishError:
    """The error for a publish whose confirm did not come in time."""
    return PublishError(exchange, routing_key, "no confirm from the broker in time")


def unavailable(exc: BaseException, exchange: str, routing_key: str) -> PublishError:
    """The error for a publish that found no open channel (``exc``: why)."""
    return PublishError(exchange, routing_key, f"channel unavailable: {reason(exc)}")


NACKED = "refused by the broker (basic.nack: queue full or unavailable?)"
