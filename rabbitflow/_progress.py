"""The worker's progress lines: at INFO, one line per consumer every interval while it has
traffic, and a last one at shutdown.

Someone watching ``rabbitflow run`` sees that messages are handled, how fast, and how long
handlers take, without a metrics stack. The figures are those the dispatcher keeps anyway for
``/metrics`` (the ``rabbitflow_messages_total`` counters and the handler-duration histogram of
:mod:`rabbitflow._metrics`): a periodic task reads them and logs the difference since its last
line, so nothing is added per message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rabbitflow._duration import parse_duration
from rabbitflow._logging import get_logger
from rabbitflow._metrics import Buckets, Metrics, Value
from rabbitflow._outcome import Action
from rabbitflow.errors import ConfigurationError

log = get_logger("rabbitflow.progress")

DEFAULT_INTERVAL = "60s"
# Below this an interval is almost surely milliseconds given for seconds (30 is 30 ms).
SHORTEST_MS = 100

# Outcomes with a field of their own on every line; the rest appear when they happened.
ALWAYS = {Action.ACK: "acked", Action.RETRY: "retried", Action.DEAD_LETTER: "dead_lettered"}
SOMETIMES = {Action.DEFER: "deferred", Action.DROP: "dropped", Action.REQUEUE: "requeued"}


def interval_seconds(value: str | int | float | None) -> float | None:
    """Seconds between progress lines from a duration (``"60s"``, or milliseconds as an
    int); None turns the lines off, as do ``0`` and ``"off"``."""
    if value is None or value in (0, "0", "off"):
        return None
    try:
        # A float is seconds, as in Retry(); an int milliseconds, as in the topology file.
        millis = round(value * 1000) if isinstance(value, float) else parse_duration(value)
    except ValueError as exc:
        raise ConfigurationError(f"progress interval: {exc}") from None
    if millis < SHORTEST_MS:
        raise ConfigurationError(
            f"progress interval {value!r} is {millis} ms, below {SHORTEST_MS} ms: "
            f'write a unit ("{millis}s", "1m"), or 0 to turn the lines off'
        )
    return millis / 1000


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram (``counts`` per bucket, the last one unbounded),
    interpolated linearly inside its bucket as Prometheus's ``histogram_quantile`` does;
    None when empty. A quantile in the unbounded bucket reads as the largest bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            if index == len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - below) / count
        below += count
    return bounds[-1]  # pragma: no cover - rank <= total always lands in a bucket


class ConsumerProgress:
    """One consumer's counters and histogram, and what they read at its last line."""

    __slots__ = ("_counts", "_duration", "_histogram", "_outcomes", "queue", "total")

    def __init__(self, queue: str, metrics: Metrics) -> None:
        self.queue = queue
        # The same objects the dispatcher updates (bound once by Telemetry.bind).
        self._outcomes: dict[Action, Value] = {
            action: metrics.consumed.labels(queue, action.value) for action in Action
        }
        self._duration: Buckets = metrics.duration.histogram(queue)
        self._counts = self._read_counts()
        self._histogram = list(self._duration.counts)
        self.total = 0

    def _read_counts(self) -> dict[Action, float]:
        return {action: value.value for action, value in self._outcomes.items()}

    def take(self, elapsed: float, *, final: bool = False) -> dict[str, Any] | None:
        """The fields of a line for what happened since the last one (``elapsed`` seconds
        ago); None without traffic, unless ``final`` and something was ever handled."""
        counts, histogram = self._read_counts(), list(self._duration.counts)
        done = {action: int(counts[action] - self._counts[action]) for action in Action}
        spread = [now - before for now, before in zip(histogram, self._histogram, strict=True)]
        self._counts, self._histogram = counts, histogram
        handled = sum(done.values())
        self.total += handled
        if not handled and not (final and self.total):
            return None
        fields: dict[str, Any] = {"queue": self.queue, "handled": handled}
        fields.update({name: done[action] for action, name in ALWAYS.items()})
        fields.update({name: done[action] for action, name in SOMETIMES.items() if done[action]})
        fields["rate"] = round(handled / elapsed, 1) if elapsed > 0 else 0.0
        for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
            seconds = quantile(q, self._duration.bounds, spread)
            if seconds is not None:
                fields[name] = _ms(seconds)
        fields["interval_s"] = round(elapsed, 1)
        fields["total"] = self.total
        if final:
            fields["final"] = True
        return fields


def _ms(seconds: float) -> float:
    # Three significant digits: the histogram's buckets allow no more.
    return float(f"{seconds * 1000:.3g}")


class Progress:
    """Logs the progress lines of a worker's consumers (:meth:`run`, then :meth:`finish`)."""

    __slots__ = ("_clock", "_consumers", "_last", "interval")

    def __init__(
        self,
        metrics: Metrics,
        queues: Iterable[str],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._consumers = [ConsumerProgress(queue, metrics) for queue in sorted(queues)]
        self._clock = clock
        self._last = clock()

    async def run(self) -> None:
        """A line per consumer with traffic every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.report()

    def report(self, *, final: bool = False) -> None:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        for consumer in self._consumers:
            fields = consumer.take(elapsed, final=final)
            if fields is not None:
                log.info("progress", **fields)

    def finish(self) -> None:
        """The last line of each consumer that handled anything (at shutdown, drained)."""
        self.report(final=True)
