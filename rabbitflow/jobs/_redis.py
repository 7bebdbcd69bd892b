"""Jobs in Redis, on the connections of a :class:`~rabbitflow.idempotency.RedisStore`.

One hash per job, ``<prefix>job:<id>``, expiring ``ttl`` after its last change. A batch of
changes is one call of a Lua script (the rules of :mod:`rabbitflow.jobs._change`, atomic on
the server) with the batch as one JSON argument: one round trip, and one command for the
client to pack however many changes it carries. A change that finishes a job publishes
on ``<prefix>done:<id>``, which ``job.result()`` subscribes to before it reads the hash:
no polling, and no finish missed between the read and the wait. Cancellations go to the
sorted set ``<prefix>cancels`` (a starting worker reads the recent ones) and are published
on ``<prefix>cancel`` (running workers hear them at once).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from rabbitflow.jobs import _change as c
from rabbitflow.jobs._book import OnCancel

# A batch of changes in one call. ARGV[1]: a JSON array of changes, each [kind, at, attempt,
# queue, result, error, error_type, due_at, progress, note, started_at, id] ("" for none);
# ARGV[2]: the ttl in ms; ARGV[3]: the key prefix. Returns how many were applied. (The keys
# are made here from the prefix: a batch spans many jobs, which Redis Cluster would refuse.)
_APPLY = """
local ttl, prefix = ARGV[2], ARGV[3]
local applied = 0
for _, c in ipairs(cjson.decode(ARGV[1])) do
  local kind, at, attempt, queue = c[1], c[2], tonumber(c[3]), c[4]
  local id = c[12]
  local k = prefix .. 'job:' .. id
  local held = redis.call('HMGET', k, 'state', 'attempt')
  local state, cur = held[1], tonumber(held[2] or '0')
  local ok = false
  if kind == 'queued' then ok = not state
  elseif kind == 'replayed' then ok = (not state) or state == 'failed'
  elseif kind == 'running' then
    ok = state ~= 'succeeded' and state ~= 'cancelled' and (state == 'failed' or attempt >= cur)
  elseif kind == 'retrying' then
    ok = state ~= 'succeeded' and state ~= 'failed' and state ~= 'cancelled' and attempt >= cur
  elseif kind == 'progress' then ok = state == 'running' and attempt == cur
  elseif kind == 'succeeded' then ok = true
  elseif kind == 'failed' then ok = state ~= 'succeeded' and state ~= 'cancelled'
  elseif kind == 'cancelled' then ok = state ~= 'succeeded' and state ~= 'failed'
  end
  if ok then
    applied = applied + 1
    if not state then redis.call('HSET', k, 'id', id, 'created_at', at, 'attempt', 0) end
    if queue ~= '' then redis.call('HSET', k, 'queue', queue) end
    if kind == 'queued' then
      redis.call('HSET', k, 'state', 'queued', 'created_at', at)
    elseif kind == 'replayed' then
      redis.call('HSET', k, 'state', 'queued', 'attempt', 0)
      redis.call('HDEL', k, 'finished_at', 'due_at', 'cancel_requested')
    elseif kind == 'running' then
      redis.call('HSET', k, 'state', 'running', 'attempt', attempt, 'started_at', at)
      redis.call('HDEL', k, 'finished_at', 'due_at', 'progress', 'note')
    elseif kind == 'retrying' then
      redis.call('HSET', k, 'state', 'retrying', 'attempt', attempt, 'due_at', c[8],
                 'error', c[6], 'error_type', c[7])
    elseif kind == 'progress' then
      redis.call('HSET', k, 'progress', c[9], 'note', c[10])
    elseif kind == 'succeeded' then
      redis.call('HSET', k, 'state', 'succeeded', 'attempt', math.max(attempt, cur),
                 'finished_at', at, 'result', c[5], 'progress', 1)
      if state then redis.call('HDEL', k, 'due_at') end
    elseif kind == 'failed' then
      redis.call('HSET', k, 'state', 'failed', 'attempt', math.max(attempt, cur),
                 'finished_at', at, 'error', c[6], 'error_type', c[7])
      redis.call('HDEL', k, 'due_at')
    elseif kind == 'cancelled' then
      redis.call('HSET', k, 'state', 'cancelled', 'finished_at', at)
      redis.call('HDEL', k, 'due_at')
    end
    if c[11] ~= '' then
      -- a running change (and its progress) merged in
      redis.call('HSET', k, 'started_at', c[11], 'updated_at', at)
      if c[10] ~= '' then redis.call('HSET', k, 'note', c[10])
      elseif state then redis.call('HDEL', k, 'note') end
      if kind ~= 'succeeded' then
        if c[9] ~= '' then redis.call('HSET', k, 'progress', c[9])
        elseif state then redis.call('HDEL', k, 'progress') end
      end
    else
      redis.call('HSET', k, 'updated_at', at)
    end
    redis.call('PEXPIRE', k, ttl)
    if kind == 'succeeded' or kind == 'failed' or kind == 'cancelled' then
      redis.call('PUBLISH', prefix .. 'done:' .. id, kind)
    end
  end
end
return applied
"""

# KEYS: the job's hash, the cancels set. ARGV: at, ttl_ms, done channel, cancel channel, id.
_CANCEL = """
local k = KEYS[1]
local state = redis.call('HGET', k, 'state')
if not state then return 0 end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 1 end
if state == 'queued' or state == 'retrying' then
  redis.call('HSET', k, 'state', 'cancelled', 'finished_at', ARGV[1])
  redis.call('HDEL', k, 'due_at')
  redis.call('PUBLISH', ARGV[3], 'cancelled')
end
redis.call('HSET', k, 'cancel_requested', 1, 'updated_at', ARGV[1])
redis.call('PEXPIRE', k, ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]) / 1000)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

_OPTIONAL = ("queue", "result", "error", "error_type", "note", "started_at", "finished_at")
_NUMBERS = ("created_at", "started_at", "finished_at", "due_at", "updated_at", "progress")


class RedisJobs:
    """A book's backend on ``client`` (the store's ``redis.asyncio.Redis``)."""

    __slots__ = ("_apply", "_cancel", "_client", "name", "prefix", "timeout", "ttl_ms")

    def __init__(self, client: Any, prefix: str, ttl_ms: int, timeout: float, name: str) -> None:
        self._client = client
        self.prefix = prefix
        self.ttl_ms = ttl_ms
        self.timeout = timeout
        self.name = name
        self._apply = client.register_script(_APPLY)
        self._cancel = client.register_script(_CANCEL)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _done(self, job_id: str) -> str:
        return f"{self.prefix}done:{job_id}"

    async def apply(self, changes: Sequence[c.Change]) -> None:
        batch = json.dumps([_row(change) for change in changes])
        await self._apply(args=[batch, self.ttl_ms, self.prefix])

    async def read(self, job_id: str) -> dict[str, Any] | None:
        found = await self._client.hgetall(self._key(job_id))
        return _record(found) if found else None

    async def request_cancel(self, job_id: str, at: float) -> dict[str, Any] | None:
        keys = [self._key(job_id), f"{self.prefix}cancels"]
        args = [repr(at), self.ttl_ms, self._done(job_id), f"{self.prefix}cancel", job_id]
        if not int(await self._cancel(keys=keys, args=args)):
            return None
        return await self.read(job_id)

    async def wait_finished(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            # Subscribed before reading: a finish after the read is heard.
            await pubsub.subscribe(self._done(job_id))
            record = await self.read(job_id)
            if record is not None and record["state"] in c.FINISHING:
                return record
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    break
                # Blocks on the subscription's socket until a message (or the deadline).
                message = await pubsub.get_message(timeout=left)
                if message is not None and message.get("type") == "message":
                    break
            return await self.read(job_id)
        finally:
            await pubsub.aclose()

    async def recent_cancels(self) -> list[str]:
        found = await self._client.zrange(f"{self.prefix}cancels", 0, -1)
        return [_text(each) for each in found]

    async def listen_cancels(self, on_cancel: OnCancel) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(f"{self.prefix}cancel")
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and message.get("type") == "message":
                    on_cancel(_text(message["data"]))
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        return None  # the connections are the store's, closed with it

    def __repr__(self) -> str:
        return self.name


def _row(change: c.Change) -> list[Any]:
    return [
        change.kind,
        change.at,
        change.attempt,
        change.queue or "",
        change.result or "",
        change.error or "",
        change.error_type or "",
        "" if change.due_at is None else change.due_at,
        "" if change.progress is None else change.progress,
        change.note or "",
        "" if change.started_at is None else change.started_at,
        change.job_id,
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(found: dict[Any, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {_text(k): _text(v) for k, v in found.items()}
    for key in _NUMBERS:
        value = record.get(key)
        record[key] = float(value) if value not in (None, "") else None
    record["attempt"] = int(record.get("attempt") or 0)
    record["cancel_requested"] = record.get("cancel_requested") == "1"
    for key in ("result", "error", "error_type", "note", "queue"):
        if record.get(key) == "":
            record[key] = None
    return record
