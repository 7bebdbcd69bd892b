"""One outbox row: the message exactly as ``app.publish`` would send it, and back.

The body comes from the core's encoder and the properties from the core's one mapping of
fields to AMQP (``rabbitflow._publisher.message_properties``); the properties are kept
marshalled, as they go on the wire, so every header keeps its AMQP type (an int stays an
int, a timestamp a timestamp) and the relay sends what was written.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pamqp import commands as spec

from rabbitflow import _headers as h
from rabbitflow._payload import encode
from rabbitflow._publisher import fit, message_properties
from rabbitflow._tracing import get_tracing

# RabbitMQ's default frame_max (131072 bytes), the size a row's headers are checked against
# when it is written: a row whose headers could not be sent fails in the caller's
# transaction, not later in the relay.
WRITE_FRAME_MAX = 131072


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """What one row holds: where it goes, its id and ordering key, body and properties."""

    exchange: str
    routing_key: str
    message_id: str
    key: str | None
    body: bytes
    properties: bytes
    job: bool = False

    def params(self) -> dict[str, Any]:
        """The insert's parameters."""
        return {
            "key": self.key,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "message_id": self.message_id,
            "body": self.body,
            "properties": self.properties,
            "job": self.job,
        }


def build_message(
    exchange: str,
    routing_key: str,
    payload: object,
    *,
    message_id: str | None = None,
    key: str | None = None,
    headers: dict[str, Any] | None = None,
    correlation_id: str | None = None,
    content_type: str | None = None,
    persistent: bool = True,
    priority: int | None = None,
    expiration: int | None = None,
    reply_to: str | None = None,
    job: bool = False,
    delay: str | int | timedelta | None = None,
) -> OutboxMessage:
    """Encode a message as :meth:`App.publish` does, with the trace context of a PRODUCER
    span opened now (in the caller's request), so that one trace runs from the caller
    through the consumer although the relay sends it later."""
    body, detected = encode(payload)
    message_id = message_id or uuid.uuid4().hex
    carried = dict(headers or {})
    if delay is not None:
        # Counted from the write, as app.publish counts from its call: a relay that is late
        # delivers it late, never early.
        carried[h.NOT_BEFORE] = h.not_before_after(delay)
    # The span covers the write: the message leaves the caller here, the relay only carries it.
    with get_tracing().publish_span(exchange, routing_key, carried, message_id):
        properties = message_properties(
            content_type or detected,
            persistent=persistent,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=carried,
            priority=priority,
            expiration=expiration,
            reply_to=reply_to,
        )
    fit(properties, WRITE_FRAME_MAX, exchange=exchange, routing_key=routing_key)
    return OutboxMessage(
        exchange, routing_key, message_id, key, body, bytes(properties.marshal()), job
    )


def read_properties(data: bytes) -> spec.Basic.Properties:
    """The AMQP properties a row holds (marshalled by :func:`build_message`)."""
    properties = spec.Basic.Properties()
    # Basic's 14 properties fit in one 16-bit flags word (bit 0 would announce another).
    properties.unmarshal(int.from_bytes(data[:2], "big"), data[2:])
    return properties
