"""Request / reply over RabbitMQ's direct reply-to (contract section 7).

The caller side is :class:`Requester`: one consumer on the pseudo-queue
``amq.rabbitmq.reply-to`` per connection, any number of requests in flight on its channel,
each matched to its reply by ``correlation_id``. The handler side is :class:`Replier`: the
dispatcher hands it a delivery with ``reply_to`` and the handler's return value (or its final
failure), and it publishes the reply.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

import aiormq
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec
from pydantic import BaseModel

from rabbitflow import _clock as clock
from rabbitflow import _headers as h
from rabbitflow import _payload as payload
from rabbitflow._logging import get_logger
from rabbitflow._publisher import Publisher, Trim, message_properties
from rabbitflow.errors import (
    BrokerError,
    PublishConnectionError,
    PublishError,
    RemoteError,
    RequestTimeout,
)

log = get_logger("rabbitflow.rpc")

# The pseudo-queue of direct reply-to. RabbitMQ accepts a publish whose reply_to is this name
# only on a channel that already consumes from it (in no-ack mode), and rewrites reply_to to
# ``amq.rabbitmq.reply-to.<opaque token>`` naming that channel.
REPLY_TO = "amq.rabbitmq.reply-to"
DEFAULT_TIMEOUT = 30.0
# The broker drops a request that no worker took this long after its caller's deadline: as
# long as a worker consumes the queue, it settles expired requests itself (unrun, acked,
# never dead-lettered); the broker's TTL is the backstop for a queue nobody consumes.
# RabbitMQ dead-letters a message whose TTL runs out in a queue with a dead-letter
# exchange, so a TTL equal to the timeout would send every request of a backlog to the DLQ.
EXPIRY_GRACE_MIN_MS = 1000
M = TypeVar("M", bound=BaseModel)

# Whether the request being published in this task reached the connection's write queue.
_SENT: ContextVar[bool] = ContextVar("rabbitflow_request_sent", default=False)


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
        if hasattr(channel, "write_queue"):
            channel.write_queue = _SendMarker(channel.write_queue)
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
        deadline: float | None = None,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        persistent: bool = False,
    ) -> DeliveredMessage:
        """Publish a request and wait for its reply (the raw delivery).

        The publish and the wait share one deadline (``deadline`` in the loop's time, else
        ``timeout`` from now), and the request carries it: see :func:`expiry`."""
        if not self.is_open:
            raise _lost(exchange, routing_key, self._lost or "the reply channel is closed")
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + timeout
        message_id = message_id or uuid.uuid4().hex
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[DeliveredMessage] = loop.create_future()
        self._pending[correlation_id] = future
        marker = _SENT.set(False)
        try:
            async with asyncio.timeout_at(deadline) as scope:
                if await self._send(
                    exchange,
                    routing_key,
                    body,
                    deadline,
                    headers,
                    message_id,
                    correlation_id,
                    persistent,
                ):
                    return await future
        except TimeoutError:
            if not scope.expired():
                raise
        finally:
            self._pending.pop(correlation_id, None)
            sent = _SENT.get()
            _SENT.reset(marker)
        raise RequestTimeout(exchange, routing_key, timeout, sent=sent, message_id=message_id)

    async def _send(
        self,
        exchange: str,
        routing_key: str,
        body: object,
        deadline: float,
        headers: dict[str, Any] | None,
        message_id: str,
        correlation_id: str,
        persistent: bool,
    ) -> bool:
        """Publish the request unless its deadline has passed; whether it was published."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return False  # nothing is published past the deadline
        ttl_ms, stamp = expiry(left)
        if stamp is not None:
            headers = {**(headers or {}), h.DEADLINE: stamp}
        await self._publisher.publish(
            exchange,
            routing_key,
            body,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            persistent=persistent,
            reply_to=REPLY_TO,
            expiration=ttl_ms,
            timeout=None,
        )
        _SENT.set(True)  # the in-memory broker's channel publishes without a write queue
        return True

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


def expiry(left: float) -> tuple[int | None, str | None]:
    """The per-message TTL (ms) and the ``rabbitflow-deadline`` header of a request whose
    caller waits ``left`` more seconds; ``(None, None)`` for a caller that waits for ever.

    The header is the deadline on this host's clock; a worker settles the request unrun once
    its own clock is past it (no tolerance: see docs/handlers.md on clock skew). The TTL is
    relative, so the broker's part does not depend on clocks: it drops the request (or
    dead-letters it, as ``expired``) only a grace after the deadline."""
    if not math.isfinite(left):
        return None, None
    left_ms = max(math.ceil(left * 1000), 1)
    # Cut to the millisecond, never later than the caller's deadline.
    at = datetime.fromtimestamp(clock.now() + left, UTC)
    stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return left_ms + max(left_ms, EXPIRY_GRACE_MIN_MS), stamp


class _SendMarker:
    """The write queue of a requester's channel, marking the publishing task once its frames
    are queued (:data:`_SENT`).

    aiormq publishes in the caller's task: a publish cancelled before its frames are queued
    never reaches the broker; once queued, they are written whatever becomes of the caller.
    That is the line between a request that was not sent and one that was."""

    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[Any]) -> None:
        self._queue = queue

    async def put(self, frame: Any) -> None:
        await self._queue.put(frame)
        _SENT.set(True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def _lost(exchange: str, routing_key: str, reason: str) -> PublishConnectionError:
    # Before the request is published: the caller can send it again, nothing was sent.
    doing = "sending a request"
    lost = BrokerError(f"cannot send the request: {reason}", doing=doing, reason=reason)
    return PublishConnectionError(exchange, routing_key, lost)


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
    return message_properties(
        content_type,
        persistent=False,
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
    kind = h.error_type(exc)
    message = _bounded(str(exc), h.ERROR_MESSAGE_LIMIT)
    body, content_type = payload.encode({"error": {"type": kind, "message": message}})
    properties = reply_properties(request, content_type)
    properties.headers = {h.ERROR_TYPE: kind, h.ERROR_MESSAGE: message}
    return body, properties


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
