"""A circuit breaker per consumer: pause consuming while a downstream keeps failing.

While open, the consumer is cancelled, so its backlog waits in the queue (where RabbitMQ keeps
it safely) instead of burning through the retry tiers. After the cool-down the consumer
resumes half-open: the first handler result closes the breaker or opens it again.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

from rabbitflow._logging import get_logger
from rabbitflow._metrics import Value
from rabbitflow.topology._schema import CircuitBreakerTable

log = get_logger("rabbitflow.breaker")

BUCKET_SECONDS = 1.0


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts handler results in one-second buckets over a sliding window."""

    __slots__ = (
        "_buckets",
        "_gauge",
        "_on_close",
        "_on_open",
        "_resume_task",
        "_runnable",
        "config",
        "queue",
        "state",
    )

    def __init__(
        self,
        queue: str,
        config: CircuitBreakerTable,
        on_open: Callable[[], Awaitable[None]],
        on_close: Callable[[], Awaitable[None]],
        gauge: Value | None = None,
    ) -> None:
        self.queue = queue
        self._gauge = gauge or Value()  # rabbitflow_circuit_breaker_open: 1 unless closed
        self._gauge.set(0)
        self.config = config
        self.state = State.CLOSED
        self._buckets: dict[int, list[int]] = {}  # second → [calls, failures]
        self._on_open = on_open
        self._on_close = on_close
        self._resume_task: asyncio.Task[None] | None = None
        self._runnable = asyncio.Event()
        self._runnable.set()

    async def wait_runnable(self) -> None:
        """Deliveries already in hand wait here (unacked, safe) while the breaker is open."""
        await self._runnable.wait()

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def record(self, failed: bool) -> None:
        """Count one handler result; may open or close the breaker."""
        if self.state is State.HALF_OPEN:
            if failed:
                self._open(reason="trial call failed")
            else:
                self.state = State.CLOSED
                self._gauge.set(0)
                self._buckets.clear()
                log.info("circuit breaker closed", queue=self.queue)
            return
        if self.state is State.OPEN:
            return
        second = int(time.monotonic() / BUCKET_SECONDS)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = [0, 0]
            self._expire(second)
        bucket[0] += 1
        bucket[1] += failed
        if failed:
            self._evaluate()

    def _expire(self, now: int) -> None:
        oldest = now - int(self.config.window / 1000 / BUCKET_SECONDS)
        for second in [s for s in self._buckets if s <= oldest]:
            del self._buckets[second]

    def _evaluate(self) -> None:
        calls = sum(b[0] for b in self._buckets.values())
        failures = sum(b[1] for b in self._buckets.values())
        if calls >= self.config.min_calls and failures / calls >= self.config.failure_ratio:
            self._open(reason=f"{failures} of {calls} calls failed")

    def _open(self, reason: str) -> None:
        self.state = State.OPEN
        self._gauge.set(1)
        self._runnable.clear()
        self._buckets.clear()
        log.error(
            "circuit breaker opened; consuming paused",
            queue=self.queue,
            reason=reason,
            cooldown_ms=self.config.cooldown,
        )
        self._resume_task = asyncio.get_running_loop().create_task(self._cycle())

    async def _cycle(self) -> None:
        await self._on_open()
        await asyncio.sleep(self.config.cooldown / 1000)
        self.state = State.HALF_OPEN
        self._runnable.set()
        log.warning("circuit breaker half-open; consuming resumes", queue=self.queue)
        await self._on_close()

    def cancel(self) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
