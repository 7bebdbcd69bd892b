"""Jobs in a dict (``App(jobs=MemoryStore())``): tests and single-process apps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from rabbitflow import _clock as clock
from rabbitflow.jobs import _change as c
from rabbitflow.jobs._book import OnCancel

# Records past their ttl are swept after this many changes.
SWEEP_EVERY = 4096


class MemoryJobs:
    """The records of one process; waiters are futures, resolved by the change that
    finishes their job."""

    __slots__ = ("_changes", "_listeners", "_records", "_waiters", "name", "timeout", "ttl_ms")

    def __init__(self, ttl_ms: int) -> None:
        self.name = "MemoryStore()"
        self.timeout = 2.0
        self.ttl_ms = ttl_ms
        self._records: dict[str, dict[str, Any]] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listeners: set[OnCancel] = set()
        self._changes = 0

    async def apply(self, changes: Sequence[c.Change]) -> None:
        for change in changes:
            current = self._live(change.job_id)
            record = c.apply(current, change)
            if record is None:
                continue
            record["expires_at"] = change.at + self.ttl_ms / 1000
            self._records[change.job_id] = record
            if change.finishes:
                self._wake(change.job_id)
        self._changes += len(changes)
        if self._changes >= SWEEP_EVERY:
            self._changes = 0
            self._sweep()

    async def read(self, job_id: str) -> dict[str, Any] | None:
        return self._live(job_id)

    async def request_cancel(self, job_id: str, at: float) -> dict[str, Any] | None:
        record = self._live(job_id)
        if record is None:
            return None
        state = record["state"]
        if state in (c.QUEUED, c.RETRYING):
            record = {**record, "state": c.CANCELLED, "finished_at": at, "due_at": None}
        if state in (c.QUEUED, c.RETRYING, c.RUNNING):
            record = {**record, "cancel_requested": True, "updated_at": at}
            record["expires_at"] = at + self.ttl_ms / 1000
            self._records[job_id] = record
            for listener in list(self._listeners):
                listener(job_id)
            if record["state"] == c.CANCELLED:
                self._wake(job_id)
        return record

    async def wait_finished(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        record = self._live(job_id)
        if record is not None and record["state"] in c.FINISHING:
            return record
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]
        return self._live(job_id)

    async def recent_cancels(self) -> list[str]:
        return [key for key, record in self._records.items() if record.get("cancel_requested")]

    async def listen_cancels(self, on_cancel: OnCancel) -> None:
        self._listeners.add(on_cancel)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._listeners.discard(on_cancel)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return self.name

    def _live(self, job_id: str) -> dict[str, Any] | None:
        record = self._records.get(job_id)
        if record is not None and record["expires_at"] <= clock.now():
            del self._records[job_id]
            return None
        return record

    def _wake(self, job_id: str) -> None:
        for waiter in self._waiters.get(job_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _sweep(self) -> None:
        now = clock.now()
        for key in [k for k, r in self._records.items() if r["expires_at"] <= now]:
            del self._records[key]
