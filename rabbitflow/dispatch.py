"""One delivery, top to bottom: decode → handler → outcome → settle.

``Dispatcher.__call__`` is the per-message hot path: it builds nothing per message beyond what
the handler asks for (the :class:`Message` only when the handler takes one), reads no
configuration, and logs nothing on success.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from concurrent.futures import Executor
from typing import Any

from aiormq.abc import DeliveredMessage

from rabbitflow import headers as h
from rabbitflow.errors import HandlerTimeout
from rabbitflow.handler import Consumer, Signature
from rabbitflow.message import Message, read_attempt
from rabbitflow.outcome import OutcomePolicy
from rabbitflow.payload import check_envelope
from rabbitflow.settle import Settler, parse_not_before


class Dispatcher:
    """Runs the handler of one queue for each delivery of one channel."""

    __slots__ = (
        "_call",
        "_decode",
        "_executor",
        "_in_flight",
        "_is_async",
        "_limit",
        "_limiter",
        "_loop",
        "_message_only",
        "_policy",
        "_queue",
        "_settler",
        "_timeout",
        "_wants_message",
    )

    def __init__(
        self,
        consumer: Consumer,
        signature: Signature,
        policy: OutcomePolicy,
        settler: Settler,
        *,
        timeout_ms: int | None,
        max_body_size: int,
        max_in_flight: int,
        prefetch: int,
        executor: Executor,
        in_flight: set[asyncio.Task[Any]],
    ) -> None:
        self._queue = consumer.queue
        self._call = consumer.func
        self._decode = signature.decode
        self._is_async = signature.is_async
        self._wants_message = signature.wants_message
        self._message_only = signature.message_only
        self._policy = policy
        self._settler = settler
        self._timeout = timeout_ms / 1000 if timeout_ms else None
        self._limit = max_body_size
        # The broker never has more than ``prefetch`` deliveries in hand on this channel, so
        # a semaphore is only needed when concurrency is set lower than prefetch.
        self._limiter = asyncio.Semaphore(max_in_flight) if max_in_flight < prefetch else None
        self._executor = executor
        self._in_flight = in_flight
        self._loop = asyncio.get_running_loop()

    async def __call__(self, delivery: DeliveredMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            if self._limiter is None:
                await self._handle(delivery)
            else:
                async with self._limiter:
                    await self._handle(delivery)
        finally:
            self._in_flight.discard(task)

    async def _handle(self, delivery: DeliveredMessage) -> None:
        props = delivery.header.properties
        headers = props.headers
        attempt = read_attempt(headers) if headers else 1
        if headers and h.NOT_BEFORE in headers:
            not_before = parse_not_before(headers[h.NOT_BEFORE])
            if not_before is not None and not_before > time.time():
                await self._settler.defer(delivery, not_before)
                return
        try:
            check_envelope(self._queue, delivery.body, props.content_encoding, self._limit)
            if self._message_only:
                args: tuple[Any, ...] = (Message(delivery, self._queue, attempt),)
            else:
                value = self._decode(self._queue, delivery.body, props.content_type)
                args = (
                    (value, Message(delivery, self._queue, attempt))
                    if self._wants_message
                    else (value,)
                )
            await self._run(args)
        except asyncio.CancelledError:
            # Shutdown or a lost connection: the delivery stays unacked and the broker
            # requeues it when the channel closes. Never reject it here.
            raise
        except BaseException as exc:
            outcome = self._policy.decide(exc, attempt)
            await self._settler.fail(delivery, exc, outcome, attempt)
            return
        self._settler.acker.ack(delivery.delivery_tag or 0)

    async def _run(self, args: tuple[Any, ...]) -> None:
        if self._timeout is None:
            if self._is_async:
                await self._call(*args)
            else:
                await self._in_thread(args)
            return
        try:
            async with asyncio.timeout(self._timeout) as scope:
                if self._is_async:
                    await self._call(*args)
                else:
                    await self._in_thread(args)
        except TimeoutError:
            if scope.expired():
                raise HandlerTimeout(self._queue, self._timeout) from None
            raise

    def _in_thread(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        # Sync handlers run in threads so that the event loop keeps answering heartbeats.
        context = contextvars.copy_context()
        return self._loop.run_in_executor(
            self._executor, functools.partial(context.run, self._call, *args)
        )
