"""Publishing many messages at once, each confirmed (or refused) on its own.

A hand-written publisher pipelines with ``asyncio.gather`` over one publish per message: one
task, one channel-lock round and one write per message. A batch takes the channel's lock once
per chunk, numbers the chunk's messages, and hands the whole chunk to the connection as one
write; then it waits for every message's confirm. Publisher confirms stay per message: the
broker acks, nacks or returns each delivery tag, so one unroutable or refused message in a
batch fails alone and the others are still confirmed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

from rabbitflow._border import LOST, no_confirm, publish_error, unavailable
from rabbitflow._payload import encode
from rabbitflow._publisher import fit, message_properties
from rabbitflow._tracing import get_tracing
from rabbitflow.errors import (
    BatchFailure,
    BatchPublishError,
    BrokerError,
    FrameTooLarge,
    PublishConnectionError,
    PublishError,
)

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel

    from rabbitflow._publisher import Publisher

# Messages and body bytes per write. A chunk is one frame buffer: large enough that the
# per-write cost vanishes, small enough that a big batch is not copied into memory all at
# once, and that a single publish on the same channel waits at most one chunk for the lock.
CHUNK = 500
CHUNK_BYTES = 1 << 20
# The reason of a batch's message that the broker refused (basic.nack), as docs/handlers.md
# shows it.
BATCH_NACKED = "the broker nacked the message"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One encoded message of a batch and where it goes."""

    exchange: str
    routing_key: str
    mandatory: bool
    body: bytes
    properties: spec.Basic.Properties


class Batch:
    """Messages collected by :meth:`publish`, sent and confirmed together by :meth:`send`.

    ``async with app.batch() as batch:`` sends when the block ends without an exception and
    discards the batch when it raises."""

    __slots__ = ("_acquire", "_outgoing", "message_ids", "timeout")

    def __init__(
        self, acquire: Callable[[], Awaitable[Publisher]], timeout: float | None = 30.0
    ) -> None:
        self._acquire = acquire
        self._outgoing: list[Outgoing] = []
        self.timeout = timeout
        #: The ids of the messages sent by the last :meth:`send`, in order.
        self.message_ids: list[str] = []

    def __len__(self) -> int:
        return len(self._outgoing)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        payload: object,
        *,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        priority: int | None = None,
        expiration: int | None = None,
        reply_to: str | None = None,
    ) -> str:
        """Encode ``payload`` and add it to the batch (nothing is sent yet); return its id.

        The arguments are those of :meth:`App.publish`."""
        body, detected = encode(payload)
        message_id = message_id or uuid.uuid4().hex
        properties = message_properties(
            content_type or detected,
            persistent=persistent,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=headers,
            priority=priority,
            expiration=expiration,
            reply_to=reply_to,
        )
        self._outgoing.append(Outgoing(exchange, routing_key, mandatory, body, properties))
        return message_id

    async def send(self) -> list[str]:
        """Send every message added since the last send and wait for all their confirms.

        Returns the message ids in order; raises :class:`BatchPublishError` naming each
        message that was not confirmed (the others are)."""
        outgoing, self._outgoing = self._outgoing, []
        self.message_ids = [str(o.properties.message_id) for o in outgoing]
        if not outgoing:
            return []
        first = outgoing[0]
        trace_headers: dict[str, Any] = {}
        # One PRODUCER span for the batch; every message carries its context.
        with get_tracing().publish_span(first.exchange, first.routing_key, trace_headers, None):
            if trace_headers:
                for message in outgoing:
                    message.properties.headers = {
                        **(message.properties.headers or {}),
                        **trace_headers,
                    }
            try:
                publisher = await self._acquire()
            except BrokerError as exc:  # no connection: nothing of the batch was sent
                raise PublishConnectionError.of(exc, first.exchange, first.routing_key) from None
            try:
                channel = await publisher.ready_channel()
            except LOST as exc:
                unsent: Outcome = (_unavailable(first, exc), False)
                outcomes = [unsent] * len(outgoing)
            else:
                outcomes = await _send_fitting(
                    channel, outgoing, publisher.frame_max, timeout=self.timeout
                )
        failures = [
            BatchFailure(index, self.message_ids[index], error, sent)
            for index, (error, sent) in enumerate(outcomes)
            if error is not None
        ]
        if failures:
            raise BatchPublishError(first.exchange, first.routing_key, failures, self.message_ids)
        return self.message_ids

    async def __aenter__(self) -> Batch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.send()
        else:
            self._outgoing = []


Outcome = tuple[PublishError | None, bool]


async def send_batch(
    channel: AbstractChannel, outgoing: Sequence[Outgoing], *, timeout: float | None
) -> list[Outcome]:
    """Write ``outgoing`` in chunks, then collect each message's confirm: (error, sent).

    ``timeout`` bounds the whole batch: writing (a connection the broker has blocked, on a
    memory or disk alarm, takes no writes) and confirms."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    confirms: list[asyncio.Future[Any]] = []
    unsent: PublishError | None = None
    # aiormq's channel gets the batched write; any other (the in-memory broker of
    # rabbitflow.testing) one publish per message, with the same per-message outcomes.
    write = _write if isinstance(channel, aiormq.Channel) else _write_each
    for chunk in _chunks(outgoing):
        try:
            futures, drained = await write(channel, chunk)
        except LOST as exc:
            unsent = _unavailable(chunk[0], exc)
            break
        confirms += futures
        if drained is not None:
            # A channel closed while writing fails ``drained`` and the chunk's confirms
            # alike; the confirms tell each message's fate, so the drain error adds nothing.
            await asyncio.wait([drained], timeout=_left(loop, deadline))
            if not drained.done():
                reason = "not sent: the connection took no writes in time (blocked by the broker?)"
                unsent = PublishError(chunk[0].exchange, chunk[0].routing_key, reason)
                break
    if confirms:
        _, pending = await asyncio.wait(confirms, timeout=_left(loop, deadline))
        for future in pending:
            future.cancel()
    outcomes = [_outcome(m, f) for m, f in zip(outgoing, confirms, strict=False)]
    if unsent is not None:
        outcomes += [(unsent, False)] * (len(outgoing) - len(confirms))
    return outcomes


async def _send_fitting(
    channel: AbstractChannel, outgoing: Sequence[Outgoing], frame_max: int, *, timeout: float | None
) -> list[Outcome]:
    """:func:`send_batch` for the messages whose headers fit in a frame of the connection; a
    message whose headers do not fails alone, unsent, with :class:`FrameTooLarge` (sent, it
    would close the connection and fail the whole batch, and every delivery in hand)."""
    refused: dict[int, Outcome] = {}
    for index, message in enumerate(outgoing):
        if message.properties.headers:
            try:
                fit(
                    message.properties,
                    frame_max,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                )
            except FrameTooLarge as exc:
                refused[index] = (exc, False)
    if not refused:
        return await send_batch(channel, outgoing, timeout=timeout)
    fitting = [message for index, message in enumerate(outgoing) if index not in refused]
    sent = iter(await send_batch(channel, fitting, timeout=timeout))
    return [refused[index] if index in refused else next(sent) for index in range(len(outgoing))]


def _chunks(outgoing: Sequence[Outgoing]) -> Iterator[Sequence[Outgoing]]:
    start = size = 0
    for end, message in enumerate(outgoing, 1):
        size += len(message.body)
        if end - start == CHUNK or size >= CHUNK_BYTES:
            yield outgoing[start:end]
            start, size = end, 0
    if start < len(outgoing):
        yield outgoing[start:]


def _left(loop: asyncio.AbstractEventLoop, deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - loop.time(), 0.0)


Written = tuple[list[asyncio.Future[Any]], "asyncio.Future[Any] | None"]


async def _write(channel: AbstractChannel, chunk: Sequence[Outgoing]) -> Written:
    """Number the chunk's messages and queue them as one write: (confirms, written).

    This is aiormq's ``basic_publish`` for many messages at once: under the channel's lock
    the delivery tags are taken in the order the frames go out, since the broker confirms
    by that sequence; a returned message is matched to its tag by its message id."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
    chan: Any = channel  # aiormq's Channel: its confirm bookkeeping is not in the ABC
    async with chan.lock:
        first = chan.delivery_tag + 1
        futures = []
        frames: list[Any] = []
        for offset, message in enumerate(chunk):
            tag = first + offset
            future = chan.create_future()
            chan.confirmations[tag] = future
            message_id = str(message.properties.message_id)
            chan.message_id_delivery_tag[message_id] = tag
            future.add_done_callback(_forget(chan.message_id_delivery_tag, message_id, tag))
            futures.append(future)
            frames.append(
                spec.Basic.Publish(
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    mandatory=message.mandatory,
                )
            )
            frames.append(ContentHeader(properties=message.properties, body_size=len(message.body)))
            frames += chan._split_body(message.body)
        chan.delivery_tag = first + len(chunk) - 1
        drained = chan.create_future()
        payload = ChannelFrame.marshall(
            channel_number=chan.number, frames=frames, drain_future=drained
        )
        try:
            await chan.write_queue.put(payload)
        except BaseException:
            # Not queued: the broker never sees these tags; give them back.
            chan.delivery_tag = first - 1
            for offset, future in enumerate(futures):
                chan.confirmations.pop(first + offset, None)
                future.cancel()
            raise
    return futures, drained


async def _write_each(channel: AbstractChannel, chunk: Sequence[Outgoing]) -> Written:
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
    futures: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(
            channel.basic_publish(
                m.body,
                exchange=m.exchange,
                routing_key=m.routing_key,
                properties=m.properties,
                mandatory=m.mandatory,
            )
        )
        for m in chunk
    ]
    return futures, None


def _forget(index: dict[str, int], message_id: str, tag: int) -> Any:
    def forget(_: object) -> None:
        if index.get(message_id) == tag:
            del index[message_id]

    return forget


def _outcome(message: Outgoing, future: asyncio.Future[Any]) -> Outcome:
    exchange, routing_key = message.exchange, message.routing_key
    if future.cancelled():
        return no_confirm(exchange, routing_key), True
    exc = future.exception()
    if exc is None:
        if isinstance(future.result(), spec.Basic.Nack):
            return PublishError(exchange, routing_key, BATCH_NACKED), True
        return None, True
    return publish_error(exc, exchange, routing_key, nacked=BATCH_NACKED), True


def _unavailable(message: Outgoing, exc: BaseException) -> PublishError:
    return unavailable(exc, message.exchange, message.routing_key)
