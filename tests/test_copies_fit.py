"""Copies that fit in a frame: the size of a content-header frame, the trimming of rabbitflow's
headers, the envelope of a message whose own headers leave no room, and the plans that follow.

The frame size is checked against pamqp, the encoder aiormq sends with, so that it cannot
drift from what goes on the wire; the broker's side of the limit is checked in
``tests/reliability/test_oversized_copies.py``.
"""

from __future__ import annotations

import copy
import datetime
import json
from decimal import Decimal
from typing import Any

import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp import frame
from pamqp.header import ContentHeader

from rabbitflow import _envelope as envelope
from rabbitflow import _headers as h
from rabbitflow._outcome import ACK, HEADERS_MOVED, Action, OutcomePolicy
from rabbitflow._publisher import (
    Publisher,
    copy_properties,
    fit,
    frame_bound,
    header_frame_size,
)
from rabbitflow._rpc import Replier, Requester, read_reply
from rabbitflow._settle import LOSS_MEMORY, Losses, Settler
from rabbitflow.errors import CrashLimitReached, FrameTooLarge, RemoteError
from rabbitflow.testing import MemoryBroker
from rabbitflow.topology._derived import QueueRoutes
from rabbitflow.topology._model import RetryPolicy

EVERY_TYPE: dict[str, Any] = {
    "text": "é" * 300,
    "small": 7,
    "negative": -40_000,
    "big": 2**40,
    "flag": True,
    "ratio": 0.25,
    "amount": Decimal("12.50"),
    "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "nested": {"tenant": "acme", "ids": [1, "two", None]},
    "raw": bytearray(b"\x00\xff"),
    "nothing": None,
}

PROPERTIES = [
    spec.Basic.Properties(),
    spec.Basic.Properties(delivery_mode=2, headers={}),
    spec.Basic.Properties(
        content_type="application/json",
        content_encoding="gzip",
        headers=EVERY_TYPE,
        delivery_mode=2,
        priority=5,
        correlation_id="c" * 255,
        reply_to="amq.rabbitmq.reply-to.g1h2AA",
        expiration="60000",
        message_id="m-1",
        timestamp=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        message_type="order.created",
        user_id="guest",
        app_id="billing",
    ),
    spec.Basic.Properties(message_id="m-2", headers={"blob": "x" * 131_000}),
]


@pytest.mark.parametrize("properties", PROPERTIES, ids=["empty", "no-headers", "all", "large"])
@pytest.mark.parametrize("body_size", [0, 1, 10 * 1024 * 1024])
def test_header_frame_size_is_the_frame_pamqp_writes(
    properties: spec.Basic.Properties, body_size: int
) -> None:
    # The frame aiormq writes for a publish: pamqp's marshal of the content header, on any
    # channel, for any body size (the body travels in frames of its own)
    for channel in (1, 2047):
        written = frame.marshal(ContentHeader(0, body_size, properties), channel)
        assert header_frame_size(properties) == len(written)


@pytest.mark.parametrize("properties", PROPERTIES, ids=["empty", "no-headers", "all", "large"])
def test_the_cheap_bound_is_never_below_the_frame(properties: spec.Basic.Properties) -> None:
    # fit() skips the exact size when the bound fits: the bound must never be below it
    assert frame_bound(properties) >= header_frame_size(properties)


def test_the_cheap_bound_is_close_for_text_headers() -> None:
    properties = spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id="m-1",
        headers={"tenant": "acmé", "traceparent": "00-" + "a" * 52, "blob": "x" * 100_000},
    )
    without = copy.copy(properties)
    without.headers = {}
    # exact for text headers: above the frame by what it assumes of the other properties only
    assert frame_bound(properties) - header_frame_size(properties) == frame_bound(
        without
    ) - header_frame_size(without)


def _copy(
    blob: int, *, stack: str = "s" * 8000, message: str = "m" * 1000
) -> spec.Basic.Properties:
    headers = {
        "blob": "x" * blob,
        h.ATTEMPT: 3,
        h.ERROR_TYPE: "ValueError",
        h.ERROR_MESSAGE: message,
        h.ERROR_STACK: stack,
    }
    return copy_properties(spec.Basic.Properties(message_id="m"), headers)


def test_a_copy_that_fits_is_left_as_it_is() -> None:
    properties = _copy(1000)
    size = header_frame_size(properties)
    assert fit(properties, size, h.TRIMMABLE) == 0
    assert header_frame_size(properties) == size
    assert fit(properties, 0, h.TRIMMABLE) == 0  # frame_max 0: no limit


def test_the_stack_is_cut_first_keeping_its_end() -> None:
    # Given a copy 100 bytes over the frame
    stack = "Traceback (most recent call last):\n" + "a" * 8000 + "\nValueError: the end"
    properties = _copy(1000, stack=stack)
    frame_max = header_frame_size(properties) - 100

    # When it is fitted
    cut = fit(properties, frame_max, h.TRIMMABLE)

    # Then the stack lost the 100 bytes from its start, and nothing else changed
    headers = properties.headers
    assert header_frame_size(properties) == frame_max
    assert cut == 100
    assert headers[h.ERROR_STACK].startswith("...")
    assert headers[h.ERROR_STACK].endswith("ValueError: the end")
    assert headers[h.ERROR_MESSAGE] == "m" * 1000


def test_then_the_error_message_keeping_its_start() -> None:
    # Given a copy whose stack alone cannot make the room
    properties = _copy(1000, message="start " + "m" * 994)
    stack = len(properties.headers[h.ERROR_STACK])
    frame_max = header_frame_size(properties) - stack - 500

    # When it is fitted
    fit(properties, frame_max, h.TRIMMABLE)

    # Then the stack is gone, the message cut at its end, the rest kept, and the frame fits
    headers = properties.headers
    assert h.ERROR_STACK not in headers
    assert headers[h.ERROR_MESSAGE].startswith("start ")
    assert headers[h.ERROR_MESSAGE].endswith("...")
    assert headers[h.ERROR_TYPE] == "ValueError"
    assert headers["blob"] == "x" * 1000
    assert frame_max - 4 <= header_frame_size(properties) <= frame_max


def test_multibyte_text_is_cut_on_a_character_boundary() -> None:
    properties = _copy(1000, stack="é" * 4000)
    frame_max = header_frame_size(properties) - 101
    fit(properties, frame_max, h.TRIMMABLE)
    assert header_frame_size(properties) <= frame_max
    assert set(properties.headers[h.ERROR_STACK].removeprefix("...")) == {"é"}


def test_headers_that_leave_no_room_raise_frame_too_large() -> None:
    # Given a copy whose own headers alone are over the frame
    properties = _copy(5000)
    frame_max = 4096

    # Then fitting it raises, naming the sizes, after dropping the error details
    with pytest.raises(FrameTooLarge) as raised:
        fit(properties, frame_max, h.TRIMMABLE, exchange="dlx", routing_key="work")
    assert raised.value.frame_max == frame_max
    assert raised.value.size == header_frame_size(properties) > frame_max
    assert (raised.value.exchange, raised.value.routing_key) == ("dlx", "work")
    assert "4096" in str(raised.value)
    assert properties.headers[h.ERROR_TYPE] == "ValueError"


@pytest.mark.parametrize("body", [b'{"order_id": 1}', b"\x00\xff\xfe binary"])
def test_an_envelope_restores_headers_body_and_content_type(body: bytes) -> None:
    # Given a dead-letter copy of a message with headers of every AMQP type
    headers = {**EVERY_TYPE, h.ATTEMPT: 2, h.ERROR_TYPE: "ValueError"}
    properties = copy_properties(
        spec.Basic.Properties(content_type="application/json", content_encoding="gzip"),
        dict(headers),
    )

    # When its headers are moved into its body
    wrapped = envelope.wrap(properties, body)

    # Then the copy keeps rabbitflow's headers only, and says what it is
    assert properties.headers == {h.ATTEMPT: 2, h.ERROR_TYPE: "ValueError"}
    assert properties.content_type == envelope.CONTENT_TYPE
    assert properties.content_encoding is None
    document = json.loads(wrapped)
    assert document["rabbitflow_envelope"] == 1
    assert document["header_sizes"]["text"] == 1 + 4 + 1 + 4 + 600
    # and opening it gives the message back exactly as the broker delivered it
    inner = envelope.unwrap(wrapped)
    assert inner.body == body
    assert (inner.content_type, inner.content_encoding) == ("application/json", "gzip")
    delivered = ContentHeader()
    delivered.unmarshal(ContentHeader(0, 0, spec.Basic.Properties(headers=EVERY_TYPE)).marshal())
    assert inner.headers == delivered.properties.headers


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1]", b'{"rabbitflow_envelope": 2}', b'{"rabbitflow_envelope": 1}'],
)
def test_a_damaged_envelope_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError, match="envelope"):
        envelope.unwrap(body)


def _policy(*, dead_letter: bool = True) -> OutcomePolicy:
    routes = QueueRoutes("work", {100: "work.retry.100ms"}, "dlx" if dead_letter else None)
    retry = RetryPolicy(delays_ms=(100,), max_attempts=3)
    return OutcomePolicy(retry, routes, crash_limit=3)


def test_a_retry_that_does_not_fit_is_dead_lettered_in_an_envelope() -> None:
    error = ValueError("boom")
    retry = _policy().decide(error, 1)
    assert retry.action is Action.RETRY
    assert retry.attempt == 2

    instead = _policy().after_frame_too_large(retry, FrameTooLarge("", "t", 140_000, 131_072))

    assert instead is not None
    assert (instead.action, instead.reason, instead.attempt, instead.error, instead.envelope) == (
        Action.DEAD_LETTER,
        HEADERS_MOVED,
        1,
        error,
        True,
    )
    assert (instead.exchange, instead.routing_key) == ("dlx", "work")


def test_a_dead_letter_that_does_not_fit_keeps_its_reason() -> None:
    dead = _policy().decide(ValueError("boom"), 3)
    instead = _policy().after_frame_too_large(dead, FrameTooLarge("dlx", "work", 1, 0))
    assert instead is not None
    assert instead.envelope
    assert instead.reason == f"max_attempts (3) reached; {HEADERS_MOVED}"
    assert instead.attempt == 3
    # An envelope that does not fit either is a copy that failed: no further plan
    assert _policy().after_frame_too_large(instead, FrameTooLarge("dlx", "work", 1, 0)) is None


def test_without_a_dlq_a_copy_that_does_not_fit_is_dropped_loudly() -> None:
    retry = _policy(dead_letter=False).decide(ValueError("boom"), 1)
    instead = _policy(dead_letter=False).after_frame_too_large(retry, FrameTooLarge("", "t", 1, 0))
    assert instead is not None
    assert instead.action is Action.DROP


def test_a_message_in_hand_at_crash_limit_connection_losses_is_parked() -> None:
    policy = _policy()
    assert policy.after_connection_losses(2, 1) is None
    parked = policy.after_connection_losses(3, 2)
    assert parked is not None
    assert parked.action is Action.DEAD_LETTER
    assert parked.reason == "connection lost 3 times while this message was in hand"
    assert parked.attempt == 2
    assert isinstance(parked.error, CrashLimitReached)
    assert "crash_limit 3 of queue 'work'" in str(parked.error)


class _Delivery:
    """What the settler reads of a delivery: its tag, properties, routing key and body."""

    def __init__(self, message_id: str | None, body: bytes = b"{}") -> None:
        self.delivery_tag = 1
        self.header = ContentHeader(0, len(body), spec.Basic.Properties(message_id=message_id))
        self.routing_key = "work"
        self.body = body


class _Acker:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, tag: int) -> None:
        self.acked.append(tag)


async def test_losses_count_in_a_row_until_the_message_is_settled() -> None:
    # Given the losses of a queue, and a settler that shares them
    losses = Losses()
    settler = Settler(_policy(), _Acker(), None, losses=losses)  # type: ignore[arg-type]
    stuck, other = _Delivery("stuck"), _Delivery(None, b"no id: keyed by its body")

    # When the connection is lost twice with both in hand
    for _ in range(2):
        losses.lost(stuck)
        losses.lost(other)

    # Then each counts 2, redeliveries included (the same message id or body)
    assert losses.of(_Delivery("stuck")) == 2
    assert losses.of(_Delivery(None, b"no id: keyed by its body")) == 2
    # and once a message is settled, its count starts again
    await settler.settle(_Delivery(None, b"no id: keyed by its body"), ACK)  # type: ignore[arg-type]
    assert losses.of(other) == 0
    assert losses.of(stuck) == 2


def test_losses_are_bounded() -> None:
    losses = Losses()
    for n in range(LOSS_MEMORY + 10):
        losses.lost(_Delivery(str(n)))  # type: ignore[arg-type]
    assert len(losses.counts) == LOSS_MEMORY
    assert losses.of(_Delivery("0")) == 0  # type: ignore[arg-type]
    assert losses.of(_Delivery(str(LOSS_MEMORY + 9))) == 1  # type: ignore[arg-type]


async def test_an_error_reply_is_fitted_like_a_copy() -> None:
    # Given a responder whose connection takes frames of 1,100 bytes, and a final failure
    # whose message is 1 KiB
    broker = MemoryBroker()
    broker.declare_queue("pricing")
    connection = broker.connect()
    channel = await connection.channel()
    publisher = Publisher(connection, channel)  # type: ignore[arg-type]
    publisher.frame_max = 1100
    replier = Replier("pricing", publisher)

    async def on_request(delivery: DeliveredMessage) -> None:
        await replier.reply_error(delivery, ValueError("bad sku " + "x" * 2000))

    await channel.basic_consume("pricing", on_request, no_ack=True)
    requester = await Requester.open(broker.connect())  # type: ignore[arg-type]

    # When the caller asks
    reply = await requester.request("", "pricing", "A1", timeout=1)

    # Then it gets the error, its message cut to what fits in the frame
    assert header_frame_size(reply.header.properties) <= 1100
    with pytest.raises(RemoteError, match=r"ValueError: bad sku x+\.\.\.") as raised:
        read_reply(reply)
    assert len(str(raised.value)) < 1000
