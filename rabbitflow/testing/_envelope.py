"""A message as the in-memory broker holds it, and the AMQP encoding round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands as spec
from pamqp.header import ContentHeader


def roundtrip(properties: spec.Basic.Properties) -> spec.Basic.Properties:
    """A copy of ``properties`` as a client would decode them from the wire.

    Encoding refuses what RabbitMQ's wire format cannot carry (``TypeError``, as a real
    publish does) and turns values into the types aiormq hands to consumers (timestamps as
    UTC datetimes, byte arrays as ``bytearray``).
    """
    encoded = ContentHeader(0, 0, properties).marshal()
    decoded = ContentHeader()
    decoded.unmarshal(encoded)
    assert decoded.properties is not None
    return decoded.properties


@dataclass(slots=True)
class Envelope:
    """One copy of a message in one queue."""

    body: bytes
    properties: spec.Basic.Properties
    exchange: str
    routing_keys: list[str]
    seq: int = 0
    expires_at: float | None = None
    delivery_count: int = 0
    acquired_count: int = 0
    redelivered: bool = False

    @property
    def routing_key(self) -> str:
        return self.routing_keys[0] if self.routing_keys else ""

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    def copy(self) -> Envelope:
        return Envelope(self.body, roundtrip(self.properties), self.exchange, [*self.routing_keys])


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A snapshot of a message waiting in a queue, for tests to read."""

    body: bytes
    properties: spec.Basic.Properties
    exchange: str
    routing_key: str
    redelivered: bool
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, envelope: Envelope) -> StoredMessage:
        properties = roundtrip(envelope.properties)
        return cls(
            envelope.body,
            properties,
            envelope.exchange,
            envelope.routing_key,
            envelope.redelivered,
            dict(properties.headers or {}),
        )

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode()

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)
