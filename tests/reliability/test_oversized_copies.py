"""One message never takes the others down: copies that fit in a frame, and the guard that parks
a message in hand at ``crash_limit`` connection losses in a row (issue 22, part 1).

Before: a failing message whose headers nearly filled a frame made its retry copy too large
(``FRAME_ERROR ... frame_too_large``); the broker closed the worker's connection, the message
and every other one in hand came back and ran again, 11 times on a quorum queue (until its
delivery limit), for ever on a classic one. Every test runs a worker in the test's event
loop and counts its reconnections and each handler's runs.
"""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from rabbitflow import App, BatchPublishError, Message, dlq
from rabbitflow import _envelope as envelope
from rabbitflow._outcome import HEADERS_MOVED
from rabbitflow._publisher import header_frame_size
from rabbitflow.cli._dlq import render_replay
from rabbitflow.connection import connect
from rabbitflow.errors import FrameTooLarge, PublishError
from tests.support.amqp import drain_async, publish_one, wait_ready
from tests.support.broker import Rabbit
from tests.support.output import text
from tests.support.records import Runs
from tests.support.topology import app_for
from tests.support.waiting import wait_for
from tests.support.worker import running

pytestmark = [pytest.mark.broker]

APP_NAME = "recover-test"  # the connection name of app_for's apps


async def _frame_max(url: str) -> int:
    connection = await aiormq.connect(url)
    try:
        return int(connection.connection_tune.frame_max)
    finally:
        await connection.close()


def _headers_leaving(room: int, frame_max: int, message_id: str) -> dict[str, Any]:
    """User headers that leave the published message's header frame ``room`` bytes short of
    ``frame_max`` (the properties as tests.support.amqp publishes them)."""
    probe = aio_pika.Message(
        b"{}",
        message_id=message_id,
        headers={"tenant": "acme", "blob": ""},
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    blob = frame_max - room - header_frame_size(probe.properties)
    return {"tenant": "acme", "blob": "x" * blob}


def _frame(message: AbstractIncomingMessage) -> int:
    """The header frame of ``message`` as rabbitflow published it: without the headers the
    broker adds on delivery (``x-delivery-count`` of a quorum queue)."""
    properties = copy.copy(message.properties)
    properties.headers = {k: v for k, v in message.headers.items() if not k.startswith("x-")}
    return header_frame_size(properties)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_failing_message_that_nearly_fills_a_frame_keeps_the_connection(
    tmp_path: Path, vhost_url: str, queue_type: str
) -> None:
    # Given a queue with 3 attempts, a healthy slow message in hand, and a failing message
    # whose headers leave 600 bytes of its frame: less than the error headers need
    app = app_for(
        tmp_path,
        f"""
[queues.work]
queue_type = "{queue_type}"
prefetch = 4
retry = {{ delays = ["100ms"], max_attempts = 3 }}
""",
    )
    runs = Runs()
    error = "card declined: " + "d" * 900

    @app.consumer("work")
    async def handle(message: Message) -> None:
        runs.add(message)
        if message.message_id == "poison":
            raise ValueError(error)
        await asyncio.sleep(1.0)

    frame_max = await _frame_max(vhost_url)
    headers = _headers_leaving(600, frame_max, "poison")

    # When both are published
    async with running(app, vhost_url) as worker:
        await publish_one(vhost_url, "", "work", b'{"n": 1}', message_id="healthy")
        await wait_for(lambda: runs.count("healthy"), "the healthy message to start")
        await publish_one(vhost_url, "", "work", b'{"n": 2}', message_id="poison", headers=headers)
        await wait_for(lambda: runs.count("poison") >= 3, "three runs of the poison message")
        dead = await _wait_dead(vhost_url, 1)
        await asyncio.sleep(0.5)  # a fourth run, or a second of the healthy one, would show

        # Then the connection never closed: the poison ran max_attempts times, the healthy
        # message once
        assert worker.reconnections == 0
        assert [run.attempt for run in runs.of("poison")] == [1, 2, 3]
        assert runs.count("healthy") == 1

    # and the DLQ copy fits its frame, with the user's headers and the error headers, the
    # error cut to what fits
    [dead_copy] = dead
    assert dead_copy.message_id == "poison"
    assert _frame(dead_copy) <= frame_max
    assert dead_copy.headers["blob"] == headers["blob"]
    assert text(dead_copy.headers["tenant"]) == "acme"
    assert text(dead_copy.headers["rabbitflow-error-type"]) == "ValueError"
    assert dead_copy.headers["rabbitflow-attempt"] == 3
    assert text(dead_copy.headers["rabbitflow-dead-letter-reason"]) == "max_attempts (3) reached"
    message = text(dead_copy.headers["rabbitflow-error-message"])
    assert message.startswith("card declined: ddd")
    assert message.endswith("...")
    assert "rabbitflow-error-stack" not in dead_copy.headers  # no room left for it
    assert text(dead_copy.headers["rabbitflow-origin-queue"]) == "work"
    assert json.loads(dead_copy.body) == {"n": 2}
    # rabbitflow dead-lettered it, not the broker (delivery limit) as before
    assert "x-first-death-reason" not in dead_copy.headers


async def test_headers_that_leave_no_room_go_to_the_dlq_in_an_envelope_and_replay_restores_them(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a failing handler, and two messages whose own headers leave 100 and 10 bytes of
    # their frame: not enough for the headers a retry or dead-letter copy adds
    app = app_for(
        tmp_path,
        """
[queues.work]
queue_type = "classic"
retry = { delays = ["100ms"], max_attempts = 3 }
""",
    )
    runs = Runs()
    failing = True

    @app.consumer("work")
    async def handle(message: Message) -> None:
        runs.add(message)
        if failing:
            raise ValueError("card declined")

    frame_max = await _frame_max(vhost_url)
    roomy = _headers_leaving(100, frame_max, "roomy")
    tight = _headers_leaving(10, frame_max, "tight")

    async with running(app, vhost_url) as worker:
        # When they fail
        await publish_one(vhost_url, "", "work", b'{"n": 1}', message_id="roomy", headers=roomy)
        await publish_one(vhost_url, "", "work", b'{"n": 2}', message_id="tight", headers=tight)
        dead = await _wait_dead(vhost_url, 2, keep=True)

        # Then each ran once and was dead-lettered at once, without closing the connection
        assert worker.reconnections == 0
        assert runs.count("roomy") == runs.count("tight") == 1
        for dead_copy in dead:
            # with rabbitflow's headers, the error included, and the user's in the body
            assert dead_copy.content_type == envelope.CONTENT_TYPE
            assert _frame(dead_copy) <= frame_max
            assert text(dead_copy.headers["rabbitflow-error-type"]) == "ValueError"
            assert text(dead_copy.headers["rabbitflow-error-message"]) == "card declined"
            assert "ValueError: card declined" in text(dead_copy.headers["rabbitflow-error-stack"])
            assert text(dead_copy.headers["rabbitflow-dead-letter-reason"]) == HEADERS_MOVED
            assert dead_copy.headers["rabbitflow-attempt"] == 1
            assert "blob" not in dead_copy.headers
            assert "tenant" not in dead_copy.headers
            document = json.loads(dead_copy.body)
            assert set(document["header_sizes"]) == {"blob", "tenant"}
            assert document["content_type"] == "application/json"

        # When the handler is fixed and the DLQ replayed
        failing = False
        connection = await connect(vhost_url)
        try:
            report = await dlq.replay(connection, "work")
        finally:
            await connection.close()
        await wait_for(lambda: runs.count("roomy") == 2, "the replayed message to run")

        # Then the message with room runs as it was published: headers, content type, body
        [replayed] = runs.of("roomy")[1:]
        assert replayed.headers["blob"] == roomy["blob"]
        assert text(replayed.headers["tenant"]) == "acme"
        assert replayed.headers["rabbitflow-replay-count"] == 1
        assert report.moved == 1
        # and the one whose restored headers would not fit in a frame stays in the DLQ, saying why
        [kept] = report.kept
        assert kept.message_id == "tight"
        assert f"over this connection's frame_max of {frame_max} bytes" in kept.reason
        lines = list(render_replay(report, None))
        assert "1 could not be sent back" in lines[0]
        assert lines[1].startswith("  kept tight: its headers take a")
        assert runs.count("tight") == 1
        assert worker.reconnections == 0

    [left] = await drain_async(vhost_url, "work.dlq")
    assert left.message_id == "tight"
    assert left.content_type == envelope.CONTENT_TYPE


async def test_a_copy_too_large_for_a_frame_is_refused_before_it_is_sent(vhost_url: str) -> None:
    # Given a publisher on a real connection, and properties one byte over its frame_max
    from rabbitflow._publisher import Publisher

    frame_max = await _frame_max(vhost_url)
    connection = await aiormq.connect(vhost_url)
    try:
        publisher = await Publisher.open(connection)
        assert publisher.frame_max == frame_max
        properties = aio_pika.Message(
            b"",
            message_id="m",
            headers=_headers_leaving(0, frame_max, "m"),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ).properties
        properties.headers["blob"] += "x"
        assert header_frame_size(properties) == frame_max + 1

        # Then the publish is refused before anything is sent, and the connection lives on
        with pytest.raises(FrameTooLarge):
            await publisher.send_fitted("", "nowhere", b"", properties, mandatory=False)
        assert not connection.is_closed
        # and a frame of exactly frame_max bytes is one the broker takes
        properties.headers["blob"] = properties.headers["blob"][:-1]
        await publisher.send_fitted("", "nowhere", b"", properties, mandatory=False)
        # while a larger one, sent past the check, is the broker's connection error (RabbitMQ
        # tolerates 8 bytes beyond the AMQP limit, for clients that count frame_max without
        # the frame's header and end: rabbitflow keeps to the specification)
        properties.headers["blob"] += "x" * 9
        with pytest.raises(PublishError):
            await publisher.send("", "nowhere", b"", properties, mandatory=False)
        await asyncio.wait([connection.closing], timeout=5)
        assert "frame_too_large" in repr(connection.closing.exception())
    finally:
        await connection.close()


async def test_a_handler_publishing_headers_too_large_for_a_frame_fails_alone(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a handler that publishes a message with headers larger than a frame, and a
    # healthy slow message in hand beside it
    app = app_for(
        tmp_path,
        """
[queues.work]
queue_type = "classic"
prefetch = 4
retry = { delays = ["100ms"], max_attempts = 2 }

[queues.out]
queue_type = "classic"
""",
    )
    runs = Runs()
    refused: list[FrameTooLarge] = []
    frame_max = await _frame_max(vhost_url)

    @app.consumer("work")
    async def handle(message: Message) -> None:
        runs.add(message)
        if message.message_id != "relay":
            await asyncio.sleep(1.0)
            return
        try:
            await app.publish("", "out", {"n": 1}, headers={"blob": "x" * frame_max})
        except FrameTooLarge as exc:
            refused.append(exc)
            raise

    # When both are delivered
    async with running(app, vhost_url) as worker:
        await publish_one(vhost_url, "", "work", b"{}", message_id="healthy")
        await wait_for(lambda: runs.count("healthy"), "the healthy message to start")
        await publish_one(vhost_url, "", "work", b"{}", message_id="relay")
        [dead_copy] = await _wait_dead(vhost_url, 1)
        await asyncio.sleep(1.0)

        # Then the publish failed in the handler, as a retryable failure of that message only:
        # the connection stayed and the healthy message ran once
        assert len(refused) == 2
        assert refused[0].size > refused[0].frame_max == frame_max
        assert worker.reconnections == 0
        assert runs.count("healthy") == 1
    assert text(dead_copy.headers["rabbitflow-error-type"]) == "rabbitflow.errors.FrameTooLarge"
    assert f"frame_max of {frame_max} bytes" in text(dead_copy.headers["rabbitflow-error-message"])


async def _wait_dead(url: str, count: int, *, keep: bool = False) -> list[AbstractIncomingMessage]:
    """The messages of ``work.dlq`` once it holds ``count`` (taken off, unless ``keep``)."""
    await wait_ready(url, "work.dlq", count)
    taken = await drain_async(url, "work.dlq")
    if keep:
        await _put_back(url, taken)
    return taken


async def _put_back(url: str, messages: list[AbstractIncomingMessage]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for message in messages:
            again = aio_pika.Message(
                message.body,
                headers=dict(message.headers),
                content_type=message.content_type,
                message_id=message.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(again, "work.dlq")
    finally:
        await connection.close()


# -- the per-message guard against connection losses ------------------------------------------


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.management
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_message_in_hand_at_crash_limit_connection_losses_is_parked(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str, queue_type: str
) -> None:
    # Given a queue with crash_limit 3 and a handler that holds one message for a minute
    app = app_for(
        tmp_path,
        f"""
[queues.work]
queue_type = "{queue_type}"
crash_limit = 3
prefetch = 2
retry = {{ delays = ["100ms"], max_attempts = 3 }}
""",
    )
    runs = Runs()

    @app.consumer("work")
    async def handle(message: Message) -> None:
        runs.add(message)
        if message.message_id == "stuck":
            await asyncio.sleep(60)

    async with running(app, vhost_url) as worker:
        await publish_one(vhost_url, "", "work", b"{}", message_id="stuck")

        # When the worker's connection is closed three times while it holds that message
        for loss in range(1, 4):
            await wait_for(lambda n=loss: runs.count("stuck") == n, f"run {loss}", 15)
            await asyncio.to_thread(rabbit.close_connections, vhost, APP_NAME)
            await wait_for(
                lambda n=loss: worker.reconnections == n and worker.ready, "reconnect", 15
            )
        dead = await _wait_dead(vhost_url, 1)

        # Then it ran three times and was parked in the DLQ instead of a fourth run
        assert runs.count("stuck") == 3
        [dead_copy] = dead
        assert dead_copy.message_id == "stuck"
        reason = "connection lost 3 times while this message was in hand"
        assert text(dead_copy.headers["rabbitflow-dead-letter-reason"]) == reason
        assert (
            text(dead_copy.headers["rabbitflow-error-type"])
            == "rabbitflow.errors.CrashLimitReached"
        )
        # (a quorum queue counts the returns as attempts: the parked delivery was the 4th)
        assert dead_copy.headers["rabbitflow-attempt"] == (4 if queue_type == "quorum" else 1)

        # and the worker goes on: a new message runs once and is acked
        await publish_one(vhost_url, "", "work", b"{}", message_id="next")
        await wait_for(lambda: runs.count("next") == 1, "the next message to run")
        await asyncio.sleep(0.3)
        assert runs.count("next") == 1
        assert runs.count("stuck") == 3


async def test_a_deferral_that_does_not_fit_is_dead_lettered_saying_why(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a message that must not run for another minute, whose headers leave 20 bytes of
    # its frame: too few for the due time a deferral copy adds
    app = app_for(
        tmp_path,
        """
[queues.work]
queue_type = "classic"
retry = { delays = ["1s", "10s"], max_attempts = 3 }
""",
    )
    runs = Runs()

    @app.consumer("work")
    async def handle(message: Message) -> None:
        runs.add(message)

    frame_max = await _frame_max(vhost_url)
    ahead = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    not_before = 1 + len("rabbitflow-not-before") + 1 + 4 + len(ahead)  # its table entry
    headers = _headers_leaving(20, frame_max - not_before, "later")
    headers["rabbitflow-not-before"] = ahead

    # When it is delivered
    async with running(app, vhost_url) as worker:
        await publish_one(vhost_url, "", "work", b"{}", message_id="later", headers=headers)
        [dead_copy] = await _wait_dead(vhost_url, 1)

        # Then it never ran, the connection stayed, and its DLQ copy says why
        assert worker.reconnections == 0
        assert runs.runs == []
    assert dead_copy.content_type == envelope.CONTENT_TYPE
    assert text(dead_copy.headers["rabbitflow-error-type"]) == "rabbitflow.errors.FrameTooLarge"
    assert text(dead_copy.headers["rabbitflow-dead-letter-reason"]) == HEADERS_MOVED
    assert "blob" in json.loads(dead_copy.body)["header_sizes"]


async def test_a_batch_message_with_headers_too_large_for_a_frame_fails_alone(
    vhost_url: str,
) -> None:
    # Given a batch of five messages, the third with headers larger than a frame
    app = App(url=vhost_url)
    frame_max = await _frame_max(vhost_url)
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue("batch.fit", durable=True)
        async with app.batch() as batch:
            for i in range(5):
                headers = {"blob": "x" * frame_max} if i == 2 else {"i": i}
                batch.publish("", "batch.fit", {"i": i}, message_id=f"m{i}", headers=headers)

            # When it is sent
            with pytest.raises(BatchPublishError) as caught:
                await batch.send()

        # Then that message alone failed, unsent, and the others are in the queue
        [failure] = caught.value.failures
        assert (failure.index, failure.message_id, failure.sent) == (2, "m2", False)
        assert isinstance(failure.error, FrameTooLarge)
        assert caught.value.confirmed == ("m0", "m1", "m3", "m4")
        declared = await channel.declare_queue("batch.fit", passive=True)
        assert declared.declaration_result.message_count == 4
    finally:
        await connection.close()
        await app.close()
