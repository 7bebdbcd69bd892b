"""Workflows in this process's memory (``App(jobs=MemoryStore())``): tests, one process."""

from __future__ import annotations

from rabbitflow import _clock as clock
from rabbitflow.workflows._record import (
    CANCELLED,
    CLAIM,
    FAILED,
    RUNNING,
    SUCCEEDED,
    UNKNOWN,
    WAIT,
    FlowRecord,
)


class MemoryFlows:
    """:class:`~rabbitflow.workflows._store.FlowStore` in a dict (expiry not enforced)."""

    __slots__ = ("_claimants", "_flows", "_results")

    def __init__(self) -> None:
        self._flows: dict[str, FlowRecord] = {}
        self._results: dict[str, dict[int, bytes]] = {}
        self._claimants: dict[str, int] = {}

    async def create(self, record: FlowRecord, ttl_ms: int) -> None:
        self._flows.setdefault(record.id, record)
        self._results.setdefault(record.id, {})

    async def record(self, flow: str, member: int, result: bytes) -> int:
        found = self._flows.get(flow)
        if found is None:
            return UNKNOWN
        results = self._results[flow]
        results.setdefault(member, result)
        label = f"m{member}"
        found.done.add(label)
        _recovered(found, label)
        if len(results) < found.members:
            return WAIT
        claimant = self._claimants.setdefault(flow, member)
        return CLAIM if claimant == member and not found.published else WAIT

    async def results(self, flow: str) -> list[bytes]:
        results = self._results.get(flow, {})
        return [results[index] for index in sorted(results)]

    async def published(self, flow: str, finished: bool) -> None:
        found = self._flows.get(flow)
        if found is not None:
            found.published = True
            if finished:
                _finish(found, SUCCEEDED, None)

    async def step_done(self, flow: str, label: str, result: bytes | None) -> None:
        found = self._flows.get(flow)
        if found is None:
            return
        found.done.add(label)
        _recovered(found, label)
        if result is not None:
            _finish(found, SUCCEEDED, result.decode())

    async def fail(self, flow: str, label: str, error: str) -> None:
        found = self._flows.get(flow)
        if found is not None and found.state != CANCELLED:
            found.state, found.failed, found.error = FAILED, label, error
            found.finished_at = clock.now()

    async def cancel(self, flow: str) -> bool:
        found = self._flows.get(flow)
        if found is None:
            return False
        found.cancelled = True
        if found.state not in (SUCCEEDED, FAILED):
            _finish(found, CANCELLED, None)
        return True

    async def is_cancelled(self, flow: str) -> bool:
        found = self._flows.get(flow)
        return found is not None and found.cancelled

    async def get(self, flow: str) -> FlowRecord | None:
        return self._flows.get(flow)


def _recovered(found: FlowRecord, label: str) -> None:
    # The failed step succeeded after all (its dead letter was replayed).
    if found.failed == label and found.state == FAILED:
        found.state, found.failed, found.error, found.finished_at = RUNNING, None, None, None


def _finish(found: FlowRecord, state: str, result: str | None) -> None:
    found.state, found.result, found.finished_at = state, result, clock.now()
