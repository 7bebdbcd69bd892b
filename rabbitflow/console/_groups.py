"""Dead letters grouped by ``rabbitflow-error-type``, and the filters of the DLQ page."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rabbitflow.dlq import DeadLetter

# Messages rabbitflow did not dead-letter itself (TTL, overflow, delivery-limit) have no
# rabbitflow-error-type: they form one group, keyed by this value.
NO_ERROR_TYPE = ""
# How the DLQ page's error-type filter names that group ("" there means any error type).
NO_ERROR_TYPE_FILTER = "(none)"


def message_key(letter: DeadLetter) -> str:
    """How the page names one message: its ``message_id``, else its position in the DLQ."""
    return f"id:{letter.message_id}" if letter.message_id else f"at:{letter.position}"


def failed_at(letter: DeadLetter, now: datetime) -> datetime | None:
    """When the message failed (see :meth:`DeadLetter.age` for the sources)."""
    seconds, _ = letter.age(now)
    return None if seconds is None else now - timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class ErrorGroup:
    """The dead letters of one error type: how many, when, after how many attempts."""

    error_type: str
    messages: tuple[DeadLetter, ...]
    first: datetime | None
    last: datetime | None

    @property
    def count(self) -> int:
        return len(self.messages)

    @property
    def attempts(self) -> str:
        """``4``, or ``1–4`` when the messages failed after different attempt counts."""
        low = min(m.attempt for m in self.messages)
        high = max(m.attempt for m in self.messages)
        return str(low) if low == high else f"{low}–{high}"

    @property
    def sample(self) -> DeadLetter:
        return self.messages[0]


def group_by_error(letters: Iterable[DeadLetter], now: datetime) -> tuple[ErrorGroup, ...]:
    """Groups in order of size, largest first; each group keeps queue order."""
    buckets: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        buckets.setdefault(letter.error_type or NO_ERROR_TYPE, []).append(letter)
    groups = [_group(error_type, items, now) for error_type, items in buckets.items()]
    return tuple(sorted(groups, key=lambda g: -g.count))


def _group(error_type: str, items: list[DeadLetter], now: datetime) -> ErrorGroup:
    times = [t for t in (failed_at(m, now) for m in items) if t is not None]
    return ErrorGroup(error_type, tuple(items), min(times, default=None), max(times, default=None))


@dataclass(frozen=True, slots=True)
class Filters:
    """The DLQ page's filters: error type, age bounds in seconds, free text."""

    error_type: str | None = None
    older_than: float | None = None
    newer_than: float | None = None
    text: str | None = None

    @property
    def active(self) -> bool:
        values = (self.error_type, self.older_than, self.newer_than, self.text)
        return any(v is not None for v in values)

    def keep(self, letter: DeadLetter, now: datetime) -> bool:
        """Whether ``letter`` passes every filter that is set."""
        if self.error_type is not None and (letter.error_type or NO_ERROR_TYPE) != self.error_type:
            return False
        age, _ = letter.age(now)
        if self.older_than is not None and (age is None or age < self.older_than):
            return False
        if self.newer_than is not None and (age is None or age > self.newer_than):
            return False
        return self.text is None or self.text.casefold() in _haystack(letter)


def _haystack(letter: DeadLetter) -> str:
    parts = (letter.message_id, letter.error_type, letter.error_message, letter.body_preview)
    return " ".join(p for p in parts if p).casefold()


def utc(value: datetime | None) -> str:
    """``2026-12-01 18:30:12Z``, or an em dash."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def show(value: object) -> str:
    """A header value as text: bytes decoded, tables and lists as Python would print them."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return str(value)
