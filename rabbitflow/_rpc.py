"""Request / reply over RabbitMQ's direct reply-to (contract section 7).

The caller side is :class:`Requester`: one consumer on the pseudo-queue
``amq.rabbitmq.reply-to`` per connection, any number of requests in flight on its channel,
each matched to its reply by ``correlation_id``. The handler side is :class:`Replier`: the
dispatcher hands it a delivery with ``reply_to`` and the handler's return value (or its final
failure), and it publishes the reply.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar, overload

import aiormq
import structlog
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec
from pydantic import BaseModel

from rabbitflow import _headers as h
from rabbitflow import _payload as payload
from rabbitflow._publisher import Publisher, Trim
from rabbitflow.errors import BrokerError, PublishError, RemoteError, RequestTimeout

log = structlog.get_logger("rabbitflow.rpc")

# The pseudo-queue of direct reply-to. RabbitMQ accepts a publish whose reply_to is this name
# only on a channel that already consumes from it (in no-ack mode), and rewrites reply_to to
# ``amq.rabbitmq.reply-to.<opaque token>`` naming that channel.
REPLY_TO = "amq.rabbitmq.reply-to"
TRANSIENT = 1
DEFAULT_TIMEOUT = 30.0
M = TypeVar("M", bound=BaseModel)


class Requester:
    """Requests on one channel of one connection, with their replies matched by correlation id."""

    __slots__ = ("_lost", "_pending", "_publisher", "channel", "connection")

    def __init__(self, connection: aiormq.abc.AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._publisher = Publisher(connection, channel)
        self._pending: dict[str, asyncio.Future[DeliveredMessage]] = {}
        self._lost: str | None = None

    @classmethod
    async def open(cls, connection: aiormq.abc.AbstractConnection) -> Requester:
        """A confirm-mode channel consuming from ``amq.rabbitmq.reply-to``."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        requester = cls(connection, channel)
        # Replies come without acks (RabbitMQ refuses a reply consumer that acknowledges), so
        # a reply that arrives after the caller gave up costs nothing: it is dropped here.
        await channel.basic_consume(REPLY_TO, requester._on_reply, no_ack=True)
        channel.closing.add_done_callback(requester._on_closed)
        return requester

    @property
    def is_open(self) -> bool:
        return self._lost is None and not self.channel.is_closed

    @property
    def in_flight(self) -> int:
        """Requests waiting for their reply."""
        return len(self._pending)

    async def request(
        self,
        exchange: str,
        routing_key: str,
        body: object,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        persistent: bool = False,
    ) -> DeliveredMessage:
        """Publish a request and wait for its reply (the raw delivery)."""
        if not self.is_open:
            raise _lost(exchange, routing_key, self._lost or "the reply channel is closed")
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self._publisher.publish(
                    exchange,
                    routing_key,
                    body,
                    headers=headers,
                    message_id=message_id,
                    correlation_id=correlation_id,
                    persistent=persistent,
                    reply_to=REPLY_TO,
                    timeout=None,
                )
                return await future
        except TimeoutError:
            raise RequestTimeout(exchange, routing_key, timeout) from None
        finally:
            self._pending.pop(correlation_id, None)

    async def _on_reply(self, message: DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        future = self._pending.pop(correlation_id or "", None)
        if future is None or future.done():
            log.debug("reply for no request in flight (timed out?)", correlation_id=correlation_id)
            return
        future.set_result(message)

    def _on_closed(self, closing: asyncio.Future[Any]) -> None:
        # The channel goes with its connection, or alone when the broker closes it (a
        # request to a missing exchange is a channel error): either way its reply consumer
        # is gone, and the replies of the requests in flight can no longer arrive.
        reason = "the reply channel was closed (connection lost or closed)"
        if not closing.cancelled() and closing.exception() is not None:
            reason = f"the reply channel was closed: {closing.exception()!r}"
        self._lost = reason
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(BrokerError(f"no reply: {reason}"))

    async def close(self) -> None:
        """Stop consuming replies; requests in flight fail at once."""
        if not self.channel.is_closed:
            await self.channel.close()


def _lost(exchange: str, routing_key: str, reason: str) -> BrokerError:
    return BrokerError(
        f"cannot send the request to exchange {exchange!r} with routing key "
        f"{routing_key!r}: {reason}"
    )


# -- the caller reads a reply --------------------------------------------------------------


@overload
def read_reply(reply: DeliveredMessage, response_model: type[M]) -> M: ...
@overload
def read_reply(reply: DeliveredMessage, response_model: None = None) -> Any: ...
def read_reply(reply: DeliveredMessage, response_model: type[BaseModel] | None = None) -> Any:
    """The value of a reply, or :class:`RemoteError` when the handler failed for good.

    With ``response_model`` the JSON body is validated into it (a :class:`DecodeError` when it
    does not fit); without it JSON is parsed, ``text/*`` returned as ``str`` and anything else
    as ``bytes``."""
    props = reply.header.properties
    headers = props.headers or {}
    if h.ERROR_TYPE in headers:
        raise RemoteError(_text(headers[h.ERROR_TYPE]), _text(headers.get(h.ERROR_MESSAGE, "")))
    if response_model is not None:
        return payload.model_decoder(response_model)("reply", reply.body, props.content_type)
    if payload.is_json(props.content_type):
        return payload.any_decoder("reply", reply.body, props.content_type)
    if payload.media_type(props.content_type).startswith("text/"):
        return payload.text_decoder("reply", reply.body, props.content_type)
    return reply.body


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)


# -- the handler side writes a reply ----------------------------------------------------------


def reply_properties(request: DeliveredMessage, content_type: str) -> spec.Basic.Properties:
    """Properties of the reply to ``request``: its correlation id, transient, the content type."""
    props = request.header.properties
    return spec.Basic.Properties(
        content_type=content_type,
        delivery_mode=TRANSIENT,
        correlation_id=props.correlation_id,
        message_id=uuid.uuid4().hex,
    )


def encode_reply(request: DeliveredMessage, value: object) -> tuple[bytes, spec.Basic.Properties]:
    """Body and properties of the reply carrying ``value`` (models and dicts as JSON,
    ``str`` as text, ``bytes`` as octet-stream; ``None`` as JSON ``null``)."""
    body, content_type = payload.encode(value)
    return body, reply_properties(request, content_type)


def encode_error(
    request: DeliveredMessage, exc: BaseException
) -> tuple[bytes, spec.Basic.Properties]:
    """The reply telling the caller the handler failed for good; read as :class:`RemoteError`.

    The exception's type and message (bounded as on the DLQ copy) go in the
    ``rabbitflow-error-type`` / ``rabbitflow-error-message`` headers and in a JSON body
    ``{"error": {"type": ..., "message": ...}}`` for callers that are not rabbitflow."""
    kind = error_type(exc)
    message = _bounded(str(exc), h.ERROR_MESSAGE_LIMIT)
    body, content_type = payload.encode({"error": {"type": kind, "message": message}})
    properties = reply_properties(request, content_type)
    properties.headers = {h.ERROR_TYPE: kind, h.ERROR_MESSAGE: message}
    return body, properties


def error_type(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


_bounded = h.keep_head


class Replier:
    """Publishes replies for one consumer; the dispatcher calls it only for deliveries with
    ``reply_to`` (:func:`wants_reply`)."""

    __slots__ = ("publisher", "queue")

    def __init__(self, queue: str, publisher: Publisher) -> None:
        self.queue = queue
        self.publisher = publisher

    async def reply(self, request: DeliveredMessage, value: object) -> None:
        """Send the handler's return value to the caller (before the request is acked)."""
        try:
            body, properties = encode_reply(request, value)
        except TypeError as exc:
            # The handler returned something that has no wire form: the caller learns why.
            body, properties = encode_error(request, exc)
        await self._send(request, body, properties)

    async def reply_error(self, request: DeliveredMessage, exc: BaseException) -> None:
        """Tell the caller the handler failed for good (the message went to the DLQ)."""
        body, properties = encode_error(request, exc)
        # Fitted like every copy: an error reply too large for a frame would close the
        # connection, and every delivery in hand with it.
        await self._send(request, body, properties, h.TRIMMABLE)

    async def _send(
        self,
        request: DeliveredMessage,
        body: bytes,
        properties: spec.Basic.Properties,
        trims: Sequence[Trim] = (),
    ) -> None:
        reply_to = request.header.properties.reply_to or ""
        try:
            # Not mandatory: RabbitMQ treats a direct reply-to address as unroutable for the
            # mandatory flag, and a caller that gave up (timed out, disconnected) is not an
            # error of the handler. The reply goes to the default exchange, named by reply_to.
            await self.publisher.send_fitted("", reply_to, body, properties, trims, mandatory=False)
        except PublishError as exc:
            log.warning(
                "reply not sent; the caller will time out",
                queue=self.queue,
                message_id=request.header.properties.message_id,
                reply_to=reply_to,
                error=str(exc),
            )


def wants_reply(delivery: DeliveredMessage) -> bool:
    """Does the delivery ask for a reply (has ``reply_to``)?"""
    return bool(delivery.header.properties.reply_to)
