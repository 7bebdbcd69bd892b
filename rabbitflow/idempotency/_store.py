"""The protocol every idempotency store implements: claim a key with a lease, then mark it done.

A key moves ``absent → claimed (lease) → done (ttl)``; a claim whose lease ran out counts as
absent again (its holder died mid-handler), and a done key is forgotten after its ttl.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rabbitflow._duration import parse_duration

DEFAULT_TTL = "7d"
DEFAULT_LEASE = "5m"


class ClaimState(enum.Enum):
    CLAIMED = "claimed"  # this caller holds the key now: run the handler
    DONE = "done"  # handled before (within the ttl): skip it
    BUSY = "busy"  # another holder's lease runs: do not run it in parallel


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What :meth:`IdempotencyStore.claim` found; ``retry_after_ms`` is the rest of a BUSY
    key's lease (0 when unknown)."""

    state: ClaimState
    retry_after_ms: int = 0


CLAIMED = ClaimResult(ClaimState.CLAIMED)
DONE = ClaimResult(ClaimState.DONE)


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where idempotency keys live. Implement these four coroutines for another store.

    ``owner`` is unique per claim, so that a holder whose lease expired cannot release the
    claim of whoever took the key over."""

    ttl_ms: int
    lease_ms: int

    async def claim(self, key: str, owner: str, lease_ms: int) -> ClaimResult:
        """Take ``key`` for ``lease_ms`` unless it is done or claimed by a live lease."""
        ...

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        """Mark ``key`` done, kept for ``ttl_ms``."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give up ``owner``'s claim (the handler failed): a retry may claim it at once."""
        ...

    async def close(self) -> None:
        """Close connections (called when the app shuts down)."""
        ...


def durations(ttl: str | int, lease: str | int) -> tuple[int, int]:
    """``ttl`` and ``lease`` in ms, checked: both positive, the lease shorter than the ttl."""
    ttl_ms, lease_ms = parse_duration(ttl), parse_duration(lease)
    if ttl_ms <= 0 or lease_ms <= 0:
        raise ValueError("ttl and lease must be positive durations")
    if lease_ms > ttl_ms:
        raise ValueError(f"the lease ({lease}) must not be longer than the ttl ({ttl})")
    return ttl_ms, lease_ms
