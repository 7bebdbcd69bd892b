"""The protocol every idempotency store implements: claim a key with a lease, then mark it done.

A key moves ``absent → claimed (lease) → done (ttl)``; a claim whose lease ran out counts as
absent again (its holder died mid-handler), and a done key is forgotten after its ttl.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from rabbitflow._duration import parse_duration
from rabbitflow.errors import StoreUnavailableError

DEFAULT_TTL = "7d"
DEFAULT_LEASE = "5m"
# How long one store call may take before the store counts as unavailable: far below a
# connection pool's own wait (10-30 s), so that an outage pauses consuming at once.
DEFAULT_TIMEOUT = "2s"

T = TypeVar("T")


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
    claim of whoever took the key over.

    Any exception a call raises means the store did not answer: the message waits without
    spending an attempt and the consumers that need the store pause until it answers. Each
    call is bounded by the store's ``timeout`` attribute if it has one (a duration, or
    seconds as a float), else by :data:`DEFAULT_TIMEOUT`. An optional ``async ping()`` is
    the probe that finds it answering again (without one, a release of a key nobody
    holds)."""

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


# What rabbitflow treats as a store that does not answer, whatever the client library.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)


async def bounded(
    store: object,
    operation: str,
    seconds: float,
    call: Awaitable[T],
    errors: tuple[type[BaseException], ...],
) -> T:
    """``call`` within ``seconds``; a timeout or one of ``errors`` (the client's own, and
    network errors) becomes :class:`~rabbitflow.errors.StoreUnavailableError`."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await call
    except StoreUnavailableError:
        raise
    except (*errors, *NETWORK_ERRORS) as exc:
        cause: BaseException = exc
        if deadline.expired():
            cause = TimeoutError(f"no answer within {seconds:g}s")
        raise StoreUnavailableError(store, operation, cause) from exc


def timeout_seconds(timeout: str | int | float) -> float:
    """A store's call deadline in seconds: a duration (``"2s"``, ms as an int) or seconds
    as a float; positive."""
    seconds = timeout if isinstance(timeout, float) else parse_duration(timeout) / 1000
    if seconds <= 0:
        raise ValueError(f"timeout must be a positive duration, not {timeout!r}")
    return seconds


def durations(ttl: str | int, lease: str | int) -> tuple[int, int]:
    """``ttl`` and ``lease`` in ms, checked: both positive, the lease shorter than the ttl."""
    ttl_ms, lease_ms = parse_duration(ttl), parse_duration(lease)
    if ttl_ms <= 0 or lease_ms <= 0:
        raise ValueError("ttl and lease must be positive durations")
    if lease_ms > ttl_ms:
        raise ValueError(f"the lease ({lease}) must not be longer than the ttl ({ttl})")
    return ttl_ms, lease_ms
