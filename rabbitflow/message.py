"""The delivery a handler sees when it asks for one with a ``Message`` parameter."""

from __future__ import annotations

from typing import Any

from aiormq.abc import DeliveredMessage

from rabbitflow import _headers as h


def read_attempt(headers: dict[str, Any] | None) -> int:
    """The attempt a delivery is on: ``rabbitflow-attempt`` (absent = 1) plus broker redeliveries.

    A quorum queue counts returns of the same copy in ``x-delivery-count`` (a crash, a lost
    connection); each of those was a handler run too. Malformed values count as absent.
    """
    if not headers:
        return 1
    attempt = headers.get(h.ATTEMPT)
    base = attempt if type(attempt) is int and attempt >= 1 else 1
    returns = headers.get("x-delivery-count")
    return base + returns if type(returns) is int and returns > 0 else base


class Message:
    """One delivery: body, properties, routing information and the attempt it is on."""

    __slots__ = ("_delivery", "attempt", "queue")

    def __init__(self, delivery: DeliveredMessage, queue: str, attempt: int) -> None:
        self._delivery = delivery
        self.queue = queue
        self.attempt = attempt

    @property
    def body(self) -> bytes:
        return self._delivery.body

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._delivery.header.properties.headers or {})

    @property
    def message_id(self) -> str | None:
        return self._delivery.header.properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self._delivery.header.properties.correlation_id

    @property
    def content_type(self) -> str | None:
        return self._delivery.header.properties.content_type

    @property
    def routing_key(self) -> str:
        return self._delivery.routing_key or ""

    @property
    def exchange(self) -> str:
        return self._delivery.exchange or ""

    @property
    def redelivered(self) -> bool:
        return bool(getattr(self._delivery.delivery, "redelivered", False))

    @property
    def delivery_tag(self) -> int:
        return self._delivery.delivery_tag or 0

    def __repr__(self) -> str:
        return (
            f"<Message queue={self.queue!r} message_id={self.message_id!r} "
            f"attempt={self.attempt} size={len(self.body)}>"
        )
