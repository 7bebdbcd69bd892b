"""Workflows in Redis (``App(jobs=RedisStore(...))``).

Two keys per workflow, both expiring with it: ``<prefix><id>`` a hash of its state (kind,
steps, state, the failed step and its error, the claimant and whether the callback is
published, ``done:<label>`` per finished chain step) and ``<prefix><id>:r`` a hash of the
chord members' results by index. Each call is one round trip: the barrier is a Lua script,
atomic on the server, so concurrent members cannot both miss or both claim the last place.
"""

from __future__ import annotations

import json
from typing import Any

from rabbitflow import _clock as clock
from rabbitflow._urls import mask_url
from rabbitflow.idempotency._store import bounded
from rabbitflow.workflows._record import FlowRecord

# KEYS: state, results. ARGV: member, result. -1 unknown, 1 claim, 0 wait.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], math.max(redis.call('PTTL', KEYS[1]), 1))
end
local label = 'm' .. ARGV[1]
if redis.call('HGET', KEYS[1], 'failed') == label then
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HDEL', KEYS[1], 'failed', 'error', 'finished_at')
end
if redis.call('HLEN', KEYS[2]) < tonumber(redis.call('HGET', KEYS[1], 'n')) then return 0 end
local claimant = redis.call('HGET', KEYS[1], 'claimant')
if not claimant then
  redis.call('HSET', KEYS[1], 'claimant', ARGV[1])
  claimant = ARGV[1]
end
if claimant == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'published') == 0 then return 1 end
return 0
"""
# KEYS: state. ARGV: label, result or '', now.
_DONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'done:' .. ARGV[1], '1')
if redis.call('HGET', KEYS[1], 'failed') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HDEL', KEYS[1], 'failed', 'error', 'finished_at')
end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'state') ~= 'cancelled' then
  redis.call('HSET', KEYS[1], 'state', 'succeeded', 'result', ARGV[2], 'finished_at', ARGV[3])
end
return 1
"""
# KEYS: state. ARGV: '1' when the workflow is finished, now.
_PUBLISHED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'published', '1')
if ARGV[1] == '1' and redis.call('HGET', KEYS[1], 'state') ~= 'cancelled' then
  redis.call('HSET', KEYS[1], 'state', 'succeeded', 'finished_at', ARGV[2])
end
return 1
"""
# KEYS: state. ARGV: label, error, now.
_FAIL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'failed', ARGV[1], 'error', ARGV[2],
  'finished_at', ARGV[3])
return 1
"""
# KEYS: state. ARGV: now.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancelled', '1')
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'succeeded' and state ~= 'failed' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
end
return 1
"""


class RedisFlows:
    """:class:`~rabbitflow.workflows._store.FlowStore` in Redis."""

    __slots__ = ("_client", "_errors", "_scripts", "prefix", "timeout", "url")

    def __init__(self, client: Any, timeout: float, prefix: str, url: str) -> None:
        from redis.exceptions import RedisError

        self.url = url
        self.timeout = timeout
        self.prefix = prefix
        self._client = client
        self._errors: tuple[type[BaseException], ...] = (RedisError,)
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("record", _RECORD),
                ("done", _DONE),
                ("published", _PUBLISHED),
                ("fail", _FAIL),
                ("cancel", _CANCEL),
            )
        }

    def __repr__(self) -> str:
        return f"RedisFlows({mask_url(self.url)!r})"

    async def _call(self, operation: str, call: Any) -> Any:
        return await bounded(self, operation, self.timeout, call, self._errors)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._call(name, self._scripts[name](keys=keys, args=args))

    async def create(self, record: FlowRecord, ttl_ms: int) -> None:
        key = self.prefix + record.id
        fields = {
            "kind": record.kind,
            "steps": json.dumps(record.steps),
            "n": record.members,
            "state": record.state,
            "created_at": repr(record.created_at),
        }
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, ttl_ms)
            await self._call("create", pipe.execute())

    async def record(self, flow: str, member: int, result: bytes) -> int:
        key = self.prefix + flow
        return int(await self._script("record", [key, key + ":r"], [member, result]))

    async def results(self, flow: str) -> list[bytes]:
        found: dict[bytes, bytes] = await self._call(
            "results", self._client.hgetall(self.prefix + flow + ":r")
        )
        return [found[index] for index in sorted(found, key=int)]

    async def published(self, flow: str, finished: bool) -> None:
        now = repr(clock.now())
        await self._script("published", [self.prefix + flow], ["1" if finished else "0", now])

    async def step_done(self, flow: str, label: str, result: bytes | None) -> None:
        value = b"" if result is None else result
        await self._script("done", [self.prefix + flow], [label, value, repr(clock.now())])

    async def fail(self, flow: str, label: str, error: str) -> None:
        await self._script("fail", [self.prefix + flow], [label, error, repr(clock.now())])

    async def cancel(self, flow: str) -> bool:
        return bool(await self._script("cancel", [self.prefix + flow], [repr(clock.now())]))

    async def is_cancelled(self, flow: str) -> bool:
        value = await self._call("is_cancelled", self._client.hget(self.prefix + flow, "cancelled"))
        return value is not None

    async def get(self, flow: str) -> FlowRecord | None:
        key = self.prefix + flow
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.hkeys(key + ":r")
            fields, members = await self._call("get", pipe.execute())
        if not fields:
            return None
        text = {k.decode(): v.decode() for k, v in fields.items()}
        done = {name[5:] for name in text if name.startswith("done:")}
        done.update(f"m{int(index)}" for index in members)
        return FlowRecord(
            id=flow,
            kind=text["kind"],
            steps=[(label, queue) for label, queue in json.loads(text["steps"])],
            members=int(text.get("n", 0)),
            state=text["state"],
            done=done,
            failed=text.get("failed"),
            error=text.get("error"),
            result=text.get("result"),
            cancelled="cancelled" in text,
            published="published" in text,
            created_at=float(text.get("created_at", 0)),
            finished_at=float(text["finished_at"]) if "finished_at" in text else None,
        )
