"""Pausing consumers: a circuit breaker per consumer, and the dependencies they need.

While a consumer is paused it is cancelled, so its backlog waits in the queue (where RabbitMQ
keeps it safely) instead of burning through the retry tiers.

- :class:`CircuitBreaker`: a downstream of the user's keeps failing. After the cool-down the
  consumer resumes half-open: the first handler result closes the breaker or opens it again.
- :class:`Dependency`: a store of rabbitflow's own (idempotency keys) does not answer. Every
  consumer that needs it pauses until a probe finds it answering again.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import time
from collections.abc import Awaitable, Callable, Iterator

from rabbitflow._backoff import full_jitter
from rabbitflow._logging import get_logger
from rabbitflow._metrics import Value
from rabbitflow.errors import StoreUnavailableError
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


# The probe of a dependency that stopped answering: first after about PROBE_BASE seconds,
# then backing off (full jitter) up to PROBE_CAP between probes.
PROBE_BASE = 0.25
PROBE_CAP = 1.0

Probe = Callable[[], Awaitable[None]]
Pause = Callable[[], Awaitable[None]]


class Dependency:
    """A service rabbitflow itself uses for some consumers (a store): while it does not
    answer, those consumers are paused, like an open breaker, and a probe with backoff
    resumes them once it answers again.

    Unlike a breaker it counts nothing: one failure of the dependency opens it (every
    message of those consumers would meet the same failure), and the messages that met it
    wait without spending an attempt (see ``StoreUnavailableError`` in ``_outcome.py``).
    ``name`` is the dependency as logs show it; ``queues`` the queues whose consumers need
    it."""

    __slots__ = (
        "_consumers",
        "_gauge",
        "_outages",
        "_probe",
        "_task",
        "down_since",
        "name",
        "queues",
    )

    def __init__(
        self,
        name: str,
        probe: Probe,
        queues: tuple[str, ...] = (),
        *,
        gauge: Value | None = None,
        outages: Value | None = None,
    ) -> None:
        self.name = name
        self.queues = sorted(queues)
        self._probe = probe
        self._gauge = gauge or Value()  # rabbitflow_store_up: 1 while it answers
        self._gauge.set(1)
        self._outages = outages or Value()
        # The running consumers that need it, with their pause and resume.
        self._consumers: dict[object, tuple[Pause, Pause]] = {}
        self._task: asyncio.Task[None] | None = None
        self.down_since: float | None = None  # monotonic time of the failure; None: up

    @property
    def up(self) -> bool:
        return self.down_since is None

    def attach(self, consumer: object, pause: Pause, resume: Pause) -> None:
        """A consumer that needs this dependency started (paused already, when the
        dependency is down: it starts paused)."""
        self._consumers[consumer] = (pause, resume)

    def detach(self, consumer: object) -> None:
        """The consumer is gone (its connection was lost, or the worker stops)."""
        self._consumers.pop(consumer, None)

    async def check(self) -> float | None:
        """Probe once (at start): the seconds it took to answer, or None when it did not,
        and then it is down until a later probe answers."""
        started = time.monotonic()
        try:
            await self._probe()
        except Exception as exc:
            self.fail(exc)
            return None
        return time.monotonic() - started

    def fail(self, error: BaseException) -> None:
        """It did not answer: pause the consumers that need it until a probe answers."""
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        self._gauge.set(0)
        self._outages.inc()
        log.warning(
            "store unavailable; consuming paused until it answers",
            store=self.name,
            queues=self.queues,
            error=str(error),
        )
        # A context of its own: the delivery that met the failure is not the probe's.
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._recover(), context=contextvars.Context())

    async def _recover(self) -> None:
        await asyncio.gather(*(pause() for pause, _ in list(self._consumers.values())))
        probes = 0
        while True:
            probes += 1
            await asyncio.sleep(full_jitter(probes, base=PROBE_BASE, cap=PROBE_CAP))
            try:
                await self._probe()
            except Exception as exc:
                log.debug("store still unavailable", store=self.name, error=str(exc))
                continue
            break
        outage = time.monotonic() - (self.down_since or time.monotonic())
        self.down_since = None
        self._gauge.set(1)
        log.info(
            "store answers again; consuming resumed",
            store=self.name,
            queues=self.queues,
            outage_s=round(outage, 2),
            probes=probes,
        )
        await asyncio.gather(*(resume() for _, resume in list(self._consumers.values())))

    def cancel(self) -> None:
        """Stop probing (the worker stops)."""
        if self._task is not None:
            self._task.cancel()


class Dependencies:
    """The dependencies of an app's consumers: one per store, however many consumers share
    it, found again by the store that a ``StoreUnavailableError`` names."""

    __slots__ = ("_by_store", "_of_queue")

    def __init__(self) -> None:
        # id(store) -> (the store, kept so that its id stays its own; its dependency)
        self._by_store: dict[int, tuple[object, Dependency]] = {}
        self._of_queue: dict[str, list[Dependency]] = {}

    def add(self, queue: str, store: object, make: Callable[[], Dependency]) -> None:
        """``queue``'s consumer needs ``store``; ``make`` builds its dependency the first
        time the store is seen."""
        entry = self._by_store.get(id(store))
        if entry is None:
            entry = self._by_store[id(store)] = (store, make())
        self._of_queue.setdefault(queue, []).append(entry[1])

    def of(self, queue: str) -> list[Dependency]:
        """What ``queue``'s consumer needs."""
        return self._of_queue.get(queue, [])

    def __iter__(self) -> Iterator[Dependency]:
        return iter([dependency for _, dependency in self._by_store.values()])

    def __bool__(self) -> bool:
        return bool(self._by_store)

    def fail(self, error: StoreUnavailableError) -> None:
        """The store ``error`` names did not answer (unknown stores are the handler's own)."""
        entry = self._by_store.get(id(error.store))
        if entry is not None:
            entry[1].fail(error)

    def cancel(self) -> None:
        for dependency in self:
            dependency.cancel()
