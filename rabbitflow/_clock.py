"""The wall clock rabbitflow reads for ``rabbitflow-not-before`` and failure timestamps.

One seam for time: :mod:`rabbitflow.testing` swaps the source for its virtual clock, so a
``Retry(delay=...)`` longer than the largest tier waits virtual time in tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

_source: Callable[[], float] = time.time


def now() -> float:
    """Seconds since the epoch, like :func:`time.time`."""
    return _source()


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.fromtimestamp(_source(), UTC)


def use(source: Callable[[], float] | None) -> None:
    """Read time from ``source`` (epoch seconds); ``None`` restores the real clock."""
    global _source
    _source = source or time.time
