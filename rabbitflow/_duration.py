"""Durations and sizes as written in topology files: ``"250ms"``, ``"5s"``, ``"2h"``, ``"7d"``."""

from __future__ import annotations

import re

_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_SIZE_UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kib|mib|gib|kb|mb)\s*$", re.IGNORECASE)

DURATION_HINT = (
    'write a number with a unit ("250ms", "5s", "1m", "2h", "7d") or an integer of milliseconds'
)


def parse_duration(value: object) -> int:
    """Return ``value`` in whole milliseconds; raise ``ValueError`` with a fix otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; {DURATION_HINT}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            millis = float(match.group(1)) * _UNITS_MS[match.group(2)]
            if millis != int(millis):
                raise ValueError(f"{value!r} is not a whole number of milliseconds")
            return int(millis)
    raise ValueError(f"{value!r} is not a duration; {DURATION_HINT}")


def format_duration(millis: int) -> str:
    """The shortest exact label of a duration: ``500ms``, ``5s``, ``90s``, ``2h``, ``1d``."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if millis and millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"


def parse_size(value: object) -> int:
    """Return a byte size from an int or a string such as ``"16MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ValueError(f'{value!r} is not a size; write bytes as an integer or e.g. "16MiB"')
