"""Polling until something holds: from a thread (``wait_until``), or on the event loop with a
plain probe (``wait_for``) or one that awaits, such as a question to the broker (``eventually``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _expired(deadline: float, timeout: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        _expired(deadline, timeout, what)
        time.sleep(interval)
    return value


def wait_progressing(
    probe: Callable[[], tuple[T | None, int]],
    stall: float,
    what: str,
    limit: float = 900.0,
    interval: float = 0.2,
) -> T:
    """Poll ``probe`` (which answers the awaited value or None, and a count that grows while
    work goes on) until the value comes; fail naming ``what`` once the count has not grown
    for ``stall`` seconds, or after ``limit``. A slow machine takes longer; what is lost
    stops the count."""
    start = last_change = time.monotonic()
    last = -1
    while True:
        value, count = probe()
        if value:
            return value
        now = time.monotonic()
        if count != last:
            last, last_change = count, now
        if now - last_change > stall:
            raise AssertionError(f"no progress for {stall:g}s (at {count}) waiting for {what}")
        if now - start > limit:
            raise AssertionError(f"timed out after {limit:g}s (at {count}) waiting for {what}")
        time.sleep(interval)


async def wait_for(
    probe: Callable[[], T | None], what: str, timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll ``probe`` on the event loop (other tasks run meanwhile) until it is truthy."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        _expired(deadline, timeout, what)
        await asyncio.sleep(interval)
    return value


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = 10.0,
    interval: float = 0.05,
) -> T:
    """Await ``probe`` (a question to the broker, say) until it answers something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := await probe()):
        _expired(deadline, timeout, what)
        await asyncio.sleep(interval)
    return value
