"""``MemoryStore``: idempotency keys in a dict, for tests and single-process apps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbitflow import _clock as clock
from rabbitflow.idempotency._store import (
    CLAIMED,
    DEFAULT_LEASE,
    DEFAULT_TTL,
    DONE,
    ClaimResult,
    ClaimState,
    durations,
)

if TYPE_CHECKING:
    from rabbitflow.jobs._book import Book

_DONE = ""  # the owner of a done key


class MemoryStore:
    """Keys in this process only (tests, one process): duplicates are caught within it, not
    across a deployment (use :class:`~rabbitflow.idempotency.RedisStore` or
    :class:`~rabbitflow.idempotency.PostgresStore` there)."""

    __slots__ = ("_keys", "lease_ms", "ttl_ms")

    def __init__(self, *, ttl: str | int = DEFAULT_TTL, lease: str | int = DEFAULT_LEASE) -> None:
        self.ttl_ms, self.lease_ms = durations(ttl, lease)
        # key -> (owner, expires at in epoch ms); owner "" means done. rabbitflow's clock, so
        # that under TestApp leases and ttls run on the virtual clock.
        self._keys: dict[str, tuple[str, float]] = {}

    def _ms(self) -> float:
        return clock.now() * 1000

    async def claim(self, key: str, owner: str, lease_ms: int) -> ClaimResult:
        now = self._ms()
        held = self._keys.get(key)
        if held is not None and held[1] > now:
            if held[0] == _DONE:
                return DONE
            return ClaimResult(ClaimState.BUSY, int(held[1] - now))
        self._keys[key] = (owner, now + lease_ms)
        return CLAIMED

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        self._keys[key] = (_DONE, self._ms() + ttl_ms)
        if len(self._keys) > 10_000 and len(self._keys) % 1024 == 0:
            self._expire()

    async def release(self, key: str, owner: str) -> None:
        held = self._keys.get(key)
        if held is not None and held[0] == owner:
            del self._keys[key]

    async def close(self) -> None:
        return None

    def job_book(self, ttl_ms: int, *, max_result_bytes: int | None = None) -> Book:
        """Job statuses in this process (``App(jobs=MemoryStore())``; contract section 12):
        a :class:`rabbitflow.jobs.Book` whose records live ``ttl_ms``."""
        from rabbitflow.jobs._book import Book
        from rabbitflow.jobs._memory import MemoryJobs

        return Book(MemoryJobs(ttl_ms), ttl_ms, **_limit(max_result_bytes))

    def _expire(self) -> None:
        now = self._ms()
        for key in [k for k, (_, expires) in self._keys.items() if expires <= now]:
            del self._keys[key]

    def __len__(self) -> int:
        """Keys held (claimed or done, expired ones included until swept)."""
        return len(self._keys)


def _limit(max_result_bytes: int | None) -> dict[str, int]:
    return {} if max_result_bytes is None else {"max_result_bytes": max_result_bytes}
