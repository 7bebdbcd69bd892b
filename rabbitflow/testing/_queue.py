"""An in-memory queue: ready messages in order, its consumers, TTL and length limits."""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rabbitflow._broker_version import BrokerVersion
from rabbitflow.testing._envelope import Envelope, StoredMessage

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage

    from rabbitflow.testing._channel import MemoryChannel

# A quorum queue in reject-publish mode accepts publishes again once its ready messages fall
# to this share of x-max-length (rabbit_fifo's soft limit).
QUORUM_SOFT_LIMIT = 0.8
# The RabbitMQ release the in-memory broker behaves like unless told otherwise.
MODELLED_VERSION = BrokerVersion(4, 0, 5)


@dataclass(eq=False, slots=True)
class Consumer:
    """A ``basic.consume`` on one channel."""

    tag: str
    queue: str
    channel: MemoryChannel
    callback: Callable[[DeliveredMessage], Awaitable[Any]]
    no_ack: bool
    prefetch: int
    unacked: int = 0
    # consumer_timeout (ms) of a quorum consumer on 4.3+: past it the broker cancels it.
    timeout_ms: int | None = None

    def has_capacity(self) -> bool:
        if self.prefetch and self.unacked >= self.prefetch:
            return False
        return self.channel.has_capacity()


@dataclass(eq=False)
class MemoryQueue:
    """A queue of the in-memory broker. ``messages`` shows what waits in it, in order."""

    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    ready: list[Envelope] = field(default_factory=list, repr=False)
    consumers: list[Consumer] = field(default_factory=list, repr=False)
    unacked: int = 0
    blocked: bool = field(default=False, repr=False)
    version: BrokerVersion = field(default=MODELLED_VERSION, repr=False)
    _seq: int = field(default=0, repr=False)
    _head_returns: int = field(default=0, repr=False)
    _turn: int = field(default=0, repr=False)

    @property
    def kind(self) -> str:
        """``classic``, ``quorum`` or ``stream`` (``x-queue-type``)."""
        return str(self.arguments.get("x-queue-type", "classic"))

    @property
    def messages(self) -> list[StoredMessage]:
        """Copies of the ready messages, head first (deliveries not yet acked are not here)."""
        return [StoredMessage.of(envelope) for envelope in self.ready]

    def __len__(self) -> int:
        return len(self.ready)

    # -- arguments ---------------------------------------------------------------------------

    def _int_argument(self, name: str) -> int | None:
        value = self.arguments.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def overflow(self) -> str:
        return str(self.arguments.get("x-overflow", "drop-head"))

    @property
    def delivery_limit(self) -> int | None:
        """Returns a quorum message survives; 4.0's default of 20 when none is set, none for
        a negative limit on 4.0 (3.x counts every return past a negative limit)."""
        if self.kind != "quorum":
            return None
        limit = self._int_argument("x-delivery-limit")
        if limit is None:
            return self.version.default_delivery_limit
        if limit < 0 and self.version.at_least(4, 0):
            return None
        return limit

    # -- enqueue -----------------------------------------------------------------------------

    def expiry(self, envelope: Envelope, now: float) -> float | None:
        """When ``envelope`` expires: the queue's ``x-message-ttl`` or its own ``expiration``."""
        ttls = [self._int_argument("x-message-ttl")]
        if envelope.properties.expiration is not None:
            ttls.append(int(envelope.properties.expiration))
        known = [ttl for ttl in ttls if ttl is not None]
        return now + min(known) if known else None

    def refuses(self, envelope: Envelope) -> bool:
        """Would ``x-overflow = reject-publish`` refuse this message?"""
        if not self.overflow.startswith("reject-publish"):
            return False
        if self.kind == "quorum":
            # rabbit_fifo accepts the publish that crosses the limit, then refuses until the
            # queue drains below its soft limit.
            return self.blocked
        return self._over_limit(extra=1, extra_bytes=len(envelope.body))

    def put(self, envelope: Envelope, now: float) -> list[Envelope]:
        """Append ``envelope``; return the heads that ``drop-head`` pushed out."""
        self._seq += 1
        envelope.seq = self._seq
        envelope.expires_at = self.expiry(envelope, now)
        self.ready.append(envelope)
        if self.overflow.startswith("reject-publish"):
            if self.kind == "quorum" and self._over_limit():
                self.blocked = True
            return []
        dropped = []
        while self.ready and self._over_limit():
            dropped.append(self.take())
        return dropped

    def _over_limit(self, extra: int = 0, extra_bytes: int = 0) -> bool:
        max_length = self._int_argument("x-max-length")
        max_bytes = self._int_argument("x-max-length-bytes")
        if max_length is not None and len(self.ready) + extra > max_length:
            return True
        if max_bytes is not None:
            size = sum(len(envelope.body) for envelope in self.ready) + extra_bytes
            return size > max_bytes
        return False

    # -- dequeue -----------------------------------------------------------------------------

    def take(self) -> Envelope:
        """Remove and return the head."""
        envelope = self.ready.pop(0)
        if self._head_returns:
            self._head_returns -= 1
        if self.blocked:
            max_length = self._int_argument("x-max-length") or 0
            self.blocked = len(self.ready) > int(max_length * QUORUM_SOFT_LIMIT)
        return envelope

    def expired_head(self, now: float, deliverable: bool) -> bool:
        """Is the head past its TTL? (RabbitMQ expires messages at the head only.)

        A message whose TTL ends exactly now still goes to a consumer that can take it,
        which is how a TTL of 0 means "deliver at once or dead-letter"."""
        if not self.ready:
            return False
        expires_at = self.ready[0].expires_at
        if expires_at is None:
            return False
        return expires_at < now or (expires_at == now and not deliverable)

    def deadline(self) -> float | None:
        """When the head expires, if it does."""
        return self.ready[0].expires_at if self.ready else None

    def requeue(self, envelope: Envelope, *, returned: bool = False, counted: bool = True) -> bool:
        """Return an unacked delivery; False when a quorum delivery-limit dead-letters it.

        A classic queue puts it back in its original position. A quorum queue counts the
        return in ``x-delivery-count`` (unless ``counted`` is false: a nack on 4.3+) and every
        return in ``x-acquired-count`` (4.3+), and puts it at the head, after the messages
        returned before it, except a message nacked or rejected with requeue on 3.x, which
        goes to the back (``returned``: given back by a closed channel, not nacked)."""
        envelope.redelivered = True
        if self.kind != "quorum":
            bisect.insort(self.ready, envelope, key=lambda e: e.seq)
            return True
        envelope.acquired_count += 1
        if counted:
            envelope.delivery_count += 1
            limit = self.delivery_limit
            if limit is not None and envelope.delivery_count > limit:
                return False
        if returned or self.version.requeue_to_head:
            position = min(self._head_returns, len(self.ready))
            self.ready.insert(position, envelope)
            self._head_returns = position + 1
        else:
            self.ready.append(envelope)
        return True

    # -- consumers ---------------------------------------------------------------------------

    def next_consumer(self) -> Consumer | None:
        """The next consumer with room for a delivery, round-robin."""
        count = len(self.consumers)
        for step in range(count):
            consumer = self.consumers[(self._turn + step) % count]
            if consumer.has_capacity():
                self._turn = (self._turn + step + 1) % count
                return consumer
        return None
