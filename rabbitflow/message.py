"""The delivery a handler sees when it asks for one with a ``Message`` parameter."""

from __future__ import annotations

from typing import Any

from aiormq.abc import DeliveredMessage

from rabbitflow import _headers as h
from rabbitflow._tracking import CURRENT


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

    async def progress(self, fraction: float, note: str | None = None) -> None:
        """Report how far the job of this message is (``fraction`` from 0 to 1) with an
        optional ``note``: ``app.jobs.get(id)`` shows it while the handler runs. Returns at
        once (the store is written in the background); nothing happens when the consumer is
        not tracked (``track=True``)."""
        if not 0 <= fraction <= 1:  # NaN too
            raise ValueError(f"progress must be between 0 and 1, not {fraction!r}")
        job = CURRENT.get()
        if job is not None and job.job_id == self.message_id:
            job.progress(float(fraction), note)

    @property
    def cancelled(self) -> bool:
        """Whether ``job.cancel()`` asked this message's job to stop (tracked consumers):
        a handler that checks it may return early; the job then ends ``cancelled``."""
        job = CURRENT.get()
        return job is not None and job.job_id == self.message_id and job.cancelled

    def __repr__(self) -> str:
        return (
            f"<Message queue={self.queue!r} message_id={self.message_id!r} "
            f"attempt={self.attempt} size={len(self.body)}>"
        )
