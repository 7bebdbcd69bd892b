"""Helpers for the recoverability tests: an in-process worker, a run log, broker inspection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from rabbitflow import App, Message
from rabbitflow._worker import Worker, WorkerOptions
from rabbitflow.topology import derive
from rabbitflow.topology._declare import declare
from tests.rabbit import Rabbit

RECORD_ENV = "RF_RECOVER_RECORD"


def app_for(tmp_path: Path, toml: str) -> App:
    """An App whose topology file is ``toml``, written into ``tmp_path``."""
    path = tmp_path / "topology.toml"
    path.write_text(toml)
    return App(topology=path, name="recover-test")


@dataclass(frozen=True)
class Run:
    """One handler run as the handler saw it."""

    at: float
    message_id: str | None
    attempt: int
    redelivered: bool
    headers: dict[str, Any]


@dataclass
class Runs:
    """Every handler run of a test, in order."""

    runs: list[Run] = field(default_factory=list)

    def add(self, message: Message) -> Run:
        run = Run(
            time.monotonic(),
            message.message_id,
            message.attempt,
            message.redelivered,
            message.headers,
        )
        self.runs.append(run)
        return run

    def of(self, message_id: str) -> list[Run]:
        return [run for run in self.runs if run.message_id == message_id]

    def count(self, message_id: str) -> int:
        return len(self.of(message_id))


@contextlib.asynccontextmanager
async def running(
    app: App, url: str, *, ready_timeout: float = 15.0, declare: bool = True
) -> AsyncIterator[Worker]:
    """Run a worker for ``app`` in this event loop; stop it (and wait) on exit."""
    options = WorkerOptions(url=url, shutdown_timeout=5.0, declare=declare)
    worker = Worker(app, app.load_topology(), options)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.ready or task.done(), ready_timeout, "worker ready")
        if task.done():
            task.result()  # raises what stopped the worker
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)


async def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` every 50 ms until it is true; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {what}")
        await asyncio.sleep(0.05)


async def publish(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    message_id: str,
    content_type: str = "application/json",
    correlation_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish one persistent message with confirms (as any producer would)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if not exchange else await channel.get_exchange(exchange)
        await target.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                content_type=content_type,
                correlation_id=correlation_id,
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
            mandatory=True,
        )


async def publish_many(url: str, routing_key: str, message_ids: list[str]) -> None:
    """Publish one small JSON message per id to the queue ``routing_key`` (default exchange)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for message_id in message_ids:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b"{}",
                    message_id=message_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=routing_key,
                mandatory=True,
            )


async def declare_topology(app: App, url: str) -> None:
    """Declare the app's topology the way ``rabbitflow topology declare`` does."""
    connection = await aio_pika.connect(url)
    async with connection:
        await declare(connection, derive(app.load_topology()))


async def drain(url: str, queue: str) -> list[AbstractIncomingMessage]:
    """Every message of ``queue``, taken with basic.get and acked (the queue ends empty)."""
    connection = await aio_pika.connect(url)
    messages: list[AbstractIncomingMessage] = []
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=True)
        while (message := await source.get(fail=False, no_ack=False)) is not None:
            await message.ack()
            messages.append(message)
    return messages


def depths(rabbit: Rabbit, vhost: str) -> dict[str, tuple[int, int, int]]:
    """``queue -> (messages, ready, unacked)`` as the broker reports them."""
    rows = rabbit.list(
        vhost, "queues", "name", "messages", "messages_ready", "messages_unacknowledged"
    )
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in rows}


def text(value: object) -> str:
    """A header value as str (the AMQP client may hand long strings over as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def record(*fields: object) -> None:
    """Append one line to ``$RF_RECOVER_RECORD`` (one O_APPEND write: survives ``os._exit``)."""
    line = " ".join(str(f) for f in fields) + "\n"
    fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def ready_counts(url: str, *queues: str) -> dict[str, int]:
    """Ready messages of each queue, by passive declare (quicker than rabbitmqctl)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        counts = {}
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            counts[name] = declared.declaration_result.message_count or 0
        return counts
