"""Where a stream consumer resumes: the offset of the last handled message, kept on the broker.

Over AMQP a stream consumer says where to start with the ``x-stream-offset`` consume argument;
the broker remembers nothing for it (offset tracking is a stream-protocol feature). rabbitflow
keeps the offset below which every message was handled in a queue of its own,
``rabbitflow.offset.<app>.<stream>`` (durable, one message: the newest). A worker starting on
any host reads it and resumes at the next offset; the first time, it starts at the queue's
``stream_offset`` (``next`` unless set).

Handlers run concurrently, so offsets finish out of order: what is stored is the highest
offset with every earlier delivery finished. A crash re-handles at most the deliveries after
it (at least once); a graceful stop stores the last one (each message handled once).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import aiormq
import aiormq.abc
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from rabbitflow._logging import get_logger
from rabbitflow._publisher import Publisher, message_properties
from rabbitflow.topology._model import QueueConfig

log = get_logger("rabbitflow.streams")

OFFSET_HEADER = "x-stream-offset"
# Classic, durable, one message: reading the record (get, then requeue) must not count as a
# delivery, which quorum queues limit.
_STORE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic", "x-max-length": 1}

Callback = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]


def offset_queue(app: str, stream: str) -> str:
    """``rabbitflow.offset.<app>.<stream>``: one per app, so two apps read a stream apart."""
    return f"rabbitflow.offset.{app}.{stream}"


class StreamOffsets:
    """The handled offsets of one stream consumer, stored as they advance."""

    def __init__(self, config: QueueConfig, app: str, publisher: Publisher) -> None:
        self.config = config
        self.queue = offset_queue(app, config.name)
        self.publisher = publisher
        self.stored: int | None = None
        self._running: set[int] = set()
        self._highest: int | None = None
        self._dirty = asyncio.Event()
        self._saver: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        amqp: aiormq.abc.AbstractConnection,
        config: QueueConfig,
        app: str,
        publisher: Publisher,
    ) -> StreamOffsets:
        """Read the stored offset (declaring its queue) and start storing new ones."""
        offsets = cls(config, app, publisher)
        channel = await amqp.channel()
        try:
            offsets.stored = await _read(channel, offsets.queue)
        finally:
            await channel.close()
        offsets._saver = asyncio.create_task(offsets._save_forever())
        return offsets

    def consume_arguments(self) -> dict[str, Any]:
        """``x-stream-offset``: after the stored offset, else the configured start."""
        start: int | str | datetime = (
            self.stored + 1 if self.stored is not None else self.config.stream_offset
        )
        log.info("stream consumer starts", queue=self.config.name, offset=str(start))
        return {OFFSET_HEADER: start}

    def wrap(self, dispatcher: Callback) -> Callback:
        """The consumer callback that notes each delivery's offset around ``dispatcher``."""

        async def tracked(delivery: DeliveredMessage) -> None:
            offset = _offset_of(delivery)
            if offset is None:
                await dispatcher(delivery)
                return
            self._running.add(offset)
            # Not in a finally: a handler cancelled by a lost connection did not handle it.
            await dispatcher(delivery)
            self._finished(offset)

        return tracked

    def _finished(self, offset: int) -> None:
        self._running.discard(offset)
        self._highest = offset if self._highest is None else max(self._highest, offset)
        self._dirty.set()

    def handled_through(self) -> int | None:
        """The highest offset with every earlier delivery of this consumer finished."""
        if self._highest is None:
            return None
        if self._running:
            return min(self._running) - 1
        return self._highest

    async def _save_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self.flush()
            await asyncio.sleep(0.2)  # at most five writes a second

    async def flush(self) -> None:
        """Store the handled offset now if it moved (a failed store is retried later)."""
        through = self.handled_through()
        if through is None or (self.stored is not None and through <= self.stored):
            return
        body = json.dumps({"stream": self.config.name, "offset": through}).encode()
        properties = message_properties("application/json")
        try:
            await self.publisher.send("", self.queue, body, properties)
        except Exception as exc:
            log.warning("stream offset not stored", queue=self.config.name, error=repr(exc))
            self._dirty.set()
            return
        self.stored = through

    async def close(self) -> None:
        """Store the last handled offset, then stop storing."""
        self.stop()
        await self.flush()

    def stop(self) -> None:
        """Stop storing (the connection is gone; the next session reads the stored offset)."""
        if self._saver is not None:
            self._saver.cancel()


async def _read(channel: aiormq.abc.AbstractChannel, queue: str) -> int | None:
    await channel.queue_declare(queue, durable=True, arguments=_STORE_ARGUMENTS)
    got = await channel.basic_get(queue, no_ack=False)
    if not isinstance(got.delivery, spec.Basic.GetOk) or got.delivery.delivery_tag is None:
        return None
    await channel.basic_reject(got.delivery.delivery_tag, requeue=True)
    try:
        offset = json.loads(got.body)["offset"]
    except (ValueError, KeyError, TypeError):
        return None
    return offset if isinstance(offset, int) else None


def _offset_of(delivery: DeliveredMessage) -> int | None:
    headers = delivery.header.properties.headers or {}
    value = headers.get(OFFSET_HEADER)
    return value if isinstance(value, int) else None
