"""``RedisStore``: idempotency keys in Redis (``pip install 'rabbitflow[redis]'``).

One key per message: ``<prefix><queue>:<message_id>`` holds ``c:<owner>`` with the lease as
its expiry while claimed, then ``d`` with the ttl once done. Each call is one round trip (a
Lua script runs atomically on the server).
"""

from __future__ import annotations

from typing import Any

from rabbitflow._urls import mask_url
from rabbitflow.idempotency._store import (
    CLAIMED,
    DEFAULT_LEASE,
    DEFAULT_TTL,
    DONE,
    ClaimResult,
    ClaimState,
    durations,
)

# Returns 1 (claimed), 2 (done) or the remaining lease in ms, negated (busy).
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return 1
end
if held == 'd' then return 2 end
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
    its handler runs (longer than the handler takes)."""

    __slots__ = ("_claim", "_client", "_release", "lease_ms", "prefix", "ttl_ms", "url")

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        ttl: str | int = DEFAULT_TTL,
        lease: str | int = DEFAULT_LEASE,
        prefix: str = "rabbitflow:idem:",
    ) -> None:
        try:
            import redis.asyncio as redis
        except ImportError:  # pragma: no cover - depends on the environment
            from rabbitflow.errors import ConfigurationError

            raise ConfigurationError(
                "RedisStore needs the redis client: pip install 'rabbitflow[redis]'"
            ) from None
        self.ttl_ms, self.lease_ms = durations(ttl, lease)
        self.url = url
        self.prefix = prefix
        self._client: Any = redis.Redis.from_url(url)
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)

    async def claim(self, key: str, owner: str, lease_ms: int) -> ClaimResult:
        found = int(await self._claim(keys=[self.prefix + key], args=[owner, lease_ms]))
        if found == 1:
            return CLAIMED
        if found == 2:
            return DONE
        return ClaimResult(ClaimState.BUSY, -found)

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        await self._client.set(self.prefix + key, "d", px=ttl_ms)

    async def release(self, key: str, owner: str) -> None:
        await self._release(keys=[self.prefix + key], args=[owner])

    async def close(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore({mask_url(self.url)!r}, prefix={self.prefix!r})"
