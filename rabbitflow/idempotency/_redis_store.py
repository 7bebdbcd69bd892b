"""``RedisStore``: idempotency keys in Redis (``pip install 'rabbitflow[redis]'``).

One key per message: ``<prefix><queue>:<message_id>`` holds ``c:<owner>`` with the lease as
its expiry while claimed, then ``d`` with the ttl once done. Each call is one round trip (a
Lua script runs atomically on the server), bounded by the store's ``timeout``; any failure
of Redis is raised as :class:`~rabbitflow.errors.StoreUnavailableError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rabbitflow._urls import mask_url
from rabbitflow.idempotency._store import (
    CLAIMED,
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    DEFAULT_TTL,
    DONE,
    ClaimResult,
    ClaimState,
    bounded,
    durations,
    timeout_seconds,
)

if TYPE_CHECKING:
    from rabbitflow.jobs._book import Book

# Returns 1 (claimed), 2 (done) or the remaining lease in ms, negated (busy). A key this
# owner holds already counts as claimed: the client resends a call once when its connection
# broke, and the first send may have run.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return 1
end
if held == 'd' then return 2 end
if held == 'c:' .. ARGV[1] then return 1 end
return -math.max(redis.call('PTTL', KEYS[1]), 1)
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Keys in Redis, shared by every process of a deployment.

    ``url`` is a ``redis://`` (or ``rediss://``) URL; ``prefix`` starts every key; ``ttl``
    is how long a done key is remembered, ``lease`` how long a claim blocks duplicates while
    its handler runs (longer than the handler takes); ``timeout`` bounds each call (a
    duration, or seconds as a float): beyond it Redis counts as unavailable."""

    __slots__ = (
        "_claim",
        "_client",
        "_errors",
        "_release",
        "lease_ms",
        "prefix",
        "timeout",
        "ttl_ms",
        "url",
    )

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        ttl: str | int = DEFAULT_TTL,
        lease: str | int = DEFAULT_LEASE,
        prefix: str = "rabbitflow:idem:",
        timeout: str | int | float = DEFAULT_TIMEOUT,
    ) -> None:
        try:
            import redis.asyncio as redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError, RedisError, TimeoutError
        except ImportError:  # pragma: no cover - depends on the environment
            from rabbitflow.errors import ConfigurationError

            raise ConfigurationError(
                "RedisStore needs the redis client: pip install 'rabbitflow[redis]'"
            ) from None
        self.ttl_ms, self.lease_ms = durations(ttl, lease)
        self.timeout = timeout_seconds(timeout)
        self.url = url
        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (RedisError,)
        self._client: Any = redis.Redis.from_url(
            url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # After an outage the pooled connections are dead: a call that finds one is sent
            # once more on a fresh connection instead of failing.
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError, TimeoutError)),
        )
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)

    async def claim(self, key: str, owner: str, lease_ms: int) -> ClaimResult:
        call = self._claim(keys=[self.prefix + key], args=[owner, lease_ms])
        found = int(await bounded(self, "claim", self.timeout, call, self._errors))
        if found == 1:
            return CLAIMED
        if found == 2:
            return DONE
        return ClaimResult(ClaimState.BUSY, -found)

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        call = self._client.set(self.prefix + key, "d", px=ttl_ms)
        await bounded(self, "complete", self.timeout, call, self._errors)

    async def release(self, key: str, owner: str) -> None:
        call = self._release(keys=[self.prefix + key], args=[owner])
        await bounded(self, "release", self.timeout, call, self._errors)

    async def ping(self) -> None:
        """One round trip to Redis; raises StoreUnavailableError when it does not answer."""
        await bounded(self, "ping", self.timeout, self._client.ping(), self._errors)

    async def close(self) -> None:
        await self._client.aclose()

    def job_book(
        self, ttl_ms: int, *, prefix: str | None = None, max_result_bytes: int | None = None
    ) -> Book:
        """Job statuses on this store's connections (``App(jobs=RedisStore(...))``;
        contract section 12): hashes under ``prefix`` (default: this store's prefix with
        ``jobs:`` for ``idem:``), kept ``ttl_ms`` after their last change."""
        from rabbitflow.jobs._book import Book
        from rabbitflow.jobs._redis import RedisJobs

        if prefix is None:
            base = self.prefix.removesuffix("idem:")
            prefix = f"{base}jobs:" if base != self.prefix else f"{self.prefix}jobs:"
        backend = RedisJobs(self._client, prefix, ttl_ms, self.timeout, repr(self))
        limit = {} if max_result_bytes is None else {"max_result_bytes": max_result_bytes}
        return Book(backend, ttl_ms, **limit)

    def __repr__(self) -> str:
        return f"RedisStore({mask_url(self.url)!r}, prefix={self.prefix!r})"
