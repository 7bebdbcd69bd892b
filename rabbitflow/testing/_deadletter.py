"""The headers RabbitMQ writes when it dead-letters a message, and its cycle detection."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pamqp import commands as spec

from rabbitflow.testing._envelope import Envelope


def dead_lettered(
    envelope: Envelope,
    queue: str,
    reason: str,
    exchange: str,
    routing_key: str | None,
    now: float,
) -> Envelope:
    """The copy RabbitMQ publishes to ``exchange`` when ``queue`` dead-letters ``envelope``.

    ``x-death`` gets one entry per (queue, reason), most recent first: a repeat increments
    ``count`` of the existing entry (its other fields stay as they were) and moves it to the
    front. ``x-first-death-*`` are set once. A per-message ``expiration`` is removed and kept
    as ``original-expiration`` in a new entry.
    """
    old = envelope.properties
    headers: dict[str, Any] = dict(old.headers or {})
    entry: dict[str, Any] = {
        "count": 1,
        "reason": reason,
        "queue": queue,
        "time": datetime.fromtimestamp(int(now), UTC),
        "exchange": envelope.exchange,
        "routing-keys": [*envelope.routing_keys],
    }
    if old.expiration is not None:
        entry["original-expiration"] = old.expiration
    headers["x-death"] = _with_death(headers.get("x-death"), entry)
    headers.setdefault("x-first-death-reason", reason)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-exchange", envelope.exchange)
    properties = spec.Basic.Properties(
        content_type=old.content_type,
        content_encoding=old.content_encoding,
        headers=headers,
        delivery_mode=old.delivery_mode,
        priority=old.priority,
        correlation_id=old.correlation_id,
        reply_to=old.reply_to,
        expiration=None,
        message_id=old.message_id,
        timestamp=old.timestamp,
        message_type=old.message_type,
        user_id=old.user_id,
        app_id=old.app_id,
    )
    keys = [routing_key] if routing_key is not None else [*envelope.routing_keys]
    return Envelope(envelope.body, properties, exchange, keys)


def _with_death(deaths: object, entry: dict[str, Any]) -> list[dict[str, Any]]:
    others = [d for d in deaths if isinstance(d, dict)] if isinstance(deaths, list) else []
    for index, death in enumerate(others):
        if death.get("queue") == entry["queue"] and death.get("reason") == entry["reason"]:
            count = death.get("count")
            updated = {**death, "count": (count if isinstance(count, int) else 0) + 1}
            return [updated, *others[:index], *others[index + 1 :]]
    return [entry, *others]


def is_cycle(queue: str, deaths: list[dict[str, Any]]) -> bool:
    """Would dead-lettering into ``queue`` close a loop with no rejection in it?

    RabbitMQ drops such a message instead of letting it expire round and round; a loop that
    passed through a consumer's rejection is allowed (the consumer decided, not a timer).
    """
    for index, death in enumerate(deaths):
        if death.get("queue") == queue:
            return all(d.get("reason") != "rejected" for d in deaths[: index + 1])
    return False
