"""A virtual clock: message TTLs in the in-memory broker expire when a test says time passed.

The clock starts at the real wall-clock time and moves only when told to. While a
:class:`~rabbitflow.testing.TestApp` runs, rabbitflow's own wall-clock reads (the
``rabbitflow-not-before`` header of ``Retry(delay=...)``, ``rabbitflow-first-failed-at``) use
it too, so a retry delayed past the largest tier waits virtual time, not real time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rabbitflow import _clock
from rabbitflow._duration import parse_duration


class VirtualClock:
    """Milliseconds since the clock was made, and the wall-clock time they stand for."""

    __slots__ = ("_elapsed_ms", "_epoch")

    def __init__(self, start: float | None = None) -> None:
        self._epoch = time.time() if start is None else start
        self._elapsed_ms = 0.0

    def now_ms(self) -> float:
        """Virtual milliseconds since the clock was made (the broker's time base)."""
        return self._elapsed_ms

    def time(self) -> float:
        """The virtual wall-clock time in epoch seconds, like :func:`time.time`."""
        return self._epoch + self._elapsed_ms / 1000

    def advance(self, delay: str | int | float) -> None:
        """Move forward by ``delay``: ``"5s"``, or milliseconds."""
        ms = delay if isinstance(delay, float) else parse_duration(delay)
        if ms < 0:
            raise ValueError(f"cannot move a clock backwards ({delay!r})")
        self._elapsed_ms += ms

    def advance_to(self, ms: float) -> None:
        """Move forward to ``ms`` virtual milliseconds; an earlier time is ignored."""
        self._elapsed_ms = max(self._elapsed_ms, ms)


@contextlib.contextmanager
def wall_clock(clock: VirtualClock) -> Iterator[None]:
    """Make rabbitflow's runtime read ``clock`` as the wall-clock time."""
    _clock.use(clock.time)
    try:
        yield
    finally:
        _clock.use(None)
