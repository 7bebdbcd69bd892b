"""The schema of ``topology.toml`` as users write it (before defaults apply), read strictly.

TOML values have types and the schema keeps them: a string is never a boolean or a number and a
float never an integer, so ``dead_letter = "false"`` is an error instead of a true value. Each
refused value is reported with its path and the line to write instead; the key then keeps its
default so that the rest of the file is still read, and :class:`Reading` remembers which keys
were refused, for the semantic checks to skip what they would judge on a value that is not the
user's. A table that lacks a required key is left out whole.

This is plain Python rather than a pydantic model: ``rabbitflow topology validate`` is a new
process each time, and building pydantic's schema cost more than everything else it does
(docs/performance.md, "CLI start-up")."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any, Final, Literal, TypeVar, get_args

from rabbitflow._duration import DURATION_HINT, parse_duration, parse_size
from rabbitflow.types import ExchangeType, QueueType

LeaderLocator = Literal["client-local", "balanced"]
# Where a stream consumer starts the first time: a position, an offset, or a point in time.
StreamOffset = Literal["first", "last", "next"] | int | datetime.datetime

Loc = tuple[str | int, ...]
T = TypeVar("T")
Kind = Callable[[Any, Loc, "Reading"], Any]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_REQUIRED: Final = dataclasses.MISSING
# Below a second, an integer duration is almost always seconds written without their unit.
_SUSPICIOUS_MS = 1000


class _Refused:
    """Returned by a kind whose value was refused (the problem is already reported)."""


REFUSED: Final = _Refused()


class Invalid(Exception):
    """A value refused by a kind: what is wrong, and the fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class Reading:
    """What reading a document found: errors and warnings with their location, and the keys
    whose value was refused."""

    def __init__(self) -> None:
        self.errors: list[tuple[Loc, str, str]] = []
        self.warnings: list[tuple[Loc, str, str]] = []
        self.refused: set[Loc] = set()

    def error(self, loc: Loc, message: str, hint: str = "") -> None:
        self.errors.append((loc, message, hint))

    def warn(self, loc: Loc, message: str, hint: str = "") -> None:
        self.warnings.append((loc, message, hint))


def reads(kind: Kind) -> dict[str, Kind]:
    """The metadata of a table's field: how the file's value is read."""
    return {"kind": kind}


def format_path(loc: Sequence[int | str]) -> str:
    """``("queues", "billing.order-created", "retry", "delays", 1)`` → TOML-style path."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            text += f".{name}" if text else name
    return text


# --- how values are shown in messages -----------------------------------------------------


def shown(value: object) -> str:
    """``value`` as it appears in the file: ``'yes'``, ``true``, ``50.0``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(shown(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {shown(v)}" for k, v in value.items()) + " }"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


def a_kind(value: object) -> str:
    """The TOML type of ``value`` with its article: ``a string``, ``an integer``..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _name(loc: Loc) -> str:
    last = loc[-1] if loc else ""
    return last if isinstance(last, str) else ""


# --- kinds: one per sort of value ---------------------------------------------------------

_TRUE_WORDS = {"true", "yes", "on", "1", "y", "t"}
_FALSE_WORDS = {"false", "no", "off", "0", "n", "f"}


def boolean(value: object, loc: Loc, reading: Reading) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid(f"{shown(value)} is {a_kind(value)}, not true or false", _boolean_fix(value, loc))


def _boolean_fix(value: object, loc: Loc) -> str:
    name = _name(loc)
    word = str(value).strip().lower() if isinstance(value, str | int | float) else ""
    guess = "true" if word in _TRUE_WORDS else "false" if word in _FALSE_WORDS else ""
    if not guess:
        return f"write {name} = true or {name} = false"
    return f"write {name} = {guess}" + (", without quotes" if isinstance(value, str) else "")


def integer(minimum: int | None = None, maximum: int | None = None, zero: str = "") -> Kind:
    """A TOML integer within ``[minimum, maximum]``; ``zero``: the message for 0, if refused."""

    def read(value: object, loc: Loc, reading: Reading) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(
                f"{shown(value)} is {a_kind(value)}, not an integer", _int_fix(value, loc)
            )
        if value == 0 and zero:
            raise Invalid(zero)
        if minimum is not None and value < minimum:
            raise Invalid(f"{value} is below the minimum, {minimum}")
        if maximum is not None and value > maximum:
            raise Invalid(f"{value} is over the maximum, {maximum}")
        return value

    return read


def _int_fix(value: object, loc: Loc) -> str:
    name = _name(loc)
    if isinstance(value, float) and value.is_integer():
        return f"write {name} = {int(value)}"
    if isinstance(value, float):
        return "write a whole number"
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return f"write {name} = {int(value)}, without quotes"
    return ""


def ratio(value: object, loc: Loc, reading: Reading) -> float:
    """A number in (0, 1]: a float, or the integer 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        fix = ""
        if isinstance(value, str) and re.fullmatch(r"\s*\d*\.?\d+\s*", value):
            fix = f"write {_name(loc)} = {value.strip()}, without quotes"
        raise Invalid(f"{shown(value)} is {a_kind(value)}, not a number", fix)
    if not 0 < value <= 1:
        raise Invalid(f"{value} is not a proportion", "write a number above 0 and at most 1")
    return float(value)


def string(value: object, loc: Loc, reading: Reading) -> str:
    if isinstance(value, str):
        return value
    fix = f'write {_name(loc)} = "{shown(value)}"' if _name(loc) else ""
    raise Invalid(f"{shown(value)} is {a_kind(value)}, not a string", fix)


def choice(literal: Any) -> Kind:
    """One of the strings of a ``Literal`` type."""
    allowed: tuple[str, ...] = get_args(literal)
    expected = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"

    def read(value: object, loc: Loc, reading: Reading) -> str:
        if isinstance(value, str) and value in allowed:
            return value
        close = (
            difflib.get_close_matches(value.lower(), allowed, n=1) if isinstance(value, str) else []
        )
        hint = f"did you mean {close[0]!r}?" if close else ""
        raise Invalid(f"{shown(value)} is not allowed; expected {expected}", hint)

    return read


def duration(value: object, loc: Loc, reading: Reading) -> int:
    """A string with a unit or an integer of milliseconds (contract, section 1)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Invalid(f"{shown(value)} is not a duration; {DURATION_HINT}")
    try:
        millis = parse_duration(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    if not isinstance(value, str) and 0 < millis < _SUSPICIOUS_MS:
        reading.warn(
            loc,
            f'{millis} ms; did you mean "{millis}s"?',
            f'an integer is milliseconds; write "{millis}s", or "{millis}ms" to keep {millis} ms',
        )
    return millis


def size(value: object, loc: Loc, reading: Reading) -> int:
    if isinstance(value, float):
        raise Invalid(f'{shown(value)} is a float; write bytes as an integer or e.g. "16MiB"')
    try:
        return parse_size(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def array(item: Kind, min_length: int = 0, empty: str = "") -> Kind:
    """A TOML array of ``item``s, read as a tuple; refused whole if any item is refused."""

    def read(value: object, loc: Loc, reading: Reading) -> object:
        if not isinstance(value, list):
            raise Invalid(f"{shown(value)} is {a_kind(value)}, not an array")
        if len(value) < min_length:
            raise Invalid(empty or f"give at least {min_length} item(s)")
        items = [read_value(item, element, (*loc, i), reading) for i, element in enumerate(value)]
        return REFUSED if any(i is REFUSED for i in items) else tuple(items)

    return read


def arguments(value: object, loc: Loc, reading: Reading) -> dict[str, Any]:
    """AMQP arguments: a table passed through; the values are checked by ``_checks``."""
    if not isinstance(value, dict):
        raise Invalid(f"{shown(value)} is {a_kind(value)}, not a table", 'write { "x-..." = ... }')
    return dict(value)


def table(cls: type[Any]) -> Kind:
    def read(value: object, loc: Loc, reading: Reading) -> object:
        found = read_table(cls, value, loc, reading)
        return REFUSED if found is None else found

    return read


def tables(cls: type[Any]) -> Kind:
    """An array of tables; a refused one is left out, the others kept."""

    def read(value: object, loc: Loc, reading: Reading) -> object:
        if not isinstance(value, list):
            raise Invalid(f"{shown(value)} is {a_kind(value)}, not an array of tables")
        found = (read_table(cls, item, (*loc, i), reading) for i, item in enumerate(value))
        return tuple(item for item in found if item is not None)

    return read


def named_tables(cls: type[Any]) -> Kind:
    """``[queues.NAME]``: a table of tables; a refused one is left out, the others kept."""

    def read(value: object, loc: Loc, reading: Reading) -> object:
        if not isinstance(value, dict):
            raise Invalid(f"{shown(value)} is {a_kind(value)}, not a table")
        found = {name: read_table(cls, item, (*loc, name), reading) for name, item in value.items()}
        return {name: item for name, item in found.items() if item is not None}

    return read


def stream_offset(value: object, loc: Loc, reading: Reading) -> StreamOffset:
    if isinstance(value, str) and value in ("first", "last", "next"):
        return value  # type: ignore[return-value]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, datetime.datetime):
        return value
    raise Invalid(
        f"{shown(value)} is not a stream offset",
        'write "first", "last", "next", an offset (an integer >= 0) or a date-time',
    )


def read_value(kind: Kind, value: object, loc: Loc, reading: Reading) -> Any:
    """``kind`` applied to ``value``; a refusal is reported and ``REFUSED`` returned."""
    try:
        result = kind(value, loc, reading)
    except Invalid as exc:
        reading.error(loc, exc.message, exc.hint)
        result = REFUSED
    if result is REFUSED:
        reading.refused.add(loc)
    return result


def _keys(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {spec.name: spec for spec in dataclasses.fields(cls)}


def _required(spec: dataclasses.Field[Any]) -> bool:
    return spec.default is _REQUIRED and spec.default_factory is _REQUIRED


def read_table(cls: type[T], value: object, loc: Loc, reading: Reading) -> T | None:
    """A table of the file as ``cls``, or None when it lacks a required key or is no table.

    Every key is read, in the file's order, whatever the others hold."""
    if not isinstance(value, dict):
        reading.error(loc, f"{shown(value)} is {a_kind(value)}, not a table")
        reading.refused.add(loc)
        return None
    keys = _keys(cls)
    values: dict[str, Any] = {}
    complete = True
    for name, raw in value.items():
        spec = keys.get(name)
        if spec is None:
            reading.error((*loc, name), "unknown key", did_you_mean(name, list(keys)))
            continue
        result = read_value(spec.metadata["kind"], raw, (*loc, name), reading)
        if result is not REFUSED:
            values[name] = result
        elif _required(spec):
            complete = False
    for name, spec in keys.items():
        if _required(spec) and name not in value:
            reading.error((*loc, name), "required key is missing")
            complete = False
    found = cls(**values) if complete else None
    conflict = getattr(found, "conflict", None)
    if conflict:
        reading.error(loc, conflict)
        found = None
    if found is None:
        reading.refused.add(loc)
    return found


def did_you_mean(name: str, keys: list[str]) -> str:
    matches = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if matches:
        return f'did you mean "{matches[0]}"?'
    return "valid keys: " + ", ".join(sorted(keys)) if keys else ""


# --- the tables ---------------------------------------------------------------------------


_urls = array(string, 1, 'urls = [] names no node; write urls = ["amqp://host:5672/"]')


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerTable:
    """``[broker]``: where to connect when neither ``--url`` nor ``RABBITFLOW_URL`` is given.

    ``url`` names one node, ``urls`` the nodes of one cluster (not both)."""

    url: str | None = field(default=None, metadata=reads(string))
    urls: tuple[str, ...] | None = field(default=None, metadata=reads(_urls))

    @property
    def conflict(self) -> str:
        """Why the table cannot be used as written ('' if it can)."""
        if self.url is not None and self.urls is not None:
            return "set url (one node) or urls (a cluster), not both"
        return ""

    @property
    def all_urls(self) -> list[str] | None:
        """``urls``, else ``[url]``, else None."""
        if self.urls is not None:
            return list(self.urls)
        return None if self.url is None else [self.url]


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterTable:
    """``[dead_letter]``: the topic exchange that receives every dead-lettered message."""

    exchange: str = field(default="dlx", metadata=reads(string))


@dataclasses.dataclass(frozen=True, slots=True)
class BindingTable:
    """A binding from an exchange: ``{ exchange = "orders", routing_key = "order.*" }``."""

    exchange: str = field(metadata=reads(string))
    routing_key: str = field(default="", metadata=reads(string))
    arguments: dict[str, Any] = field(default_factory=dict, metadata=reads(arguments))


_delays = array(duration, 1, "no delays; write retry = false to turn retries off")


@dataclasses.dataclass(frozen=True, slots=True)
class RetryTable:
    """``retry = { delays = [...], max_attempts = N, max_defer = "1d" }``; ``retry = false``
    disables retries. ``max_defer`` bounds how long a message may wait for its
    ``rabbitflow-not-before`` (or a ``Retry(delay)``) before it is dead-lettered instead."""

    delays: tuple[int, ...] = field(metadata=reads(_delays))
    max_attempts: int | None = field(default=None, metadata=reads(integer(1)))
    max_defer: int | None = field(default=None, metadata=reads(duration))

    @property
    def enabled(self) -> bool:
        return bool(self.delays)


RETRY_OFF = RetryTable(delays=())


def retry(value: object, loc: Loc, reading: Reading) -> object:
    # ``retry = false`` is stored as an empty policy so that a single type comes out.
    if value is False:
        return RETRY_OFF
    if value is True:
        raise Invalid('retry = true is not a policy; write retry = { delays = ["1s", "10s"] }')
    if isinstance(value, str) and value.strip().lower() == "false":
        raise Invalid(f"{shown(value)} is a string", "write retry = false, without quotes")
    return table(RetryTable)(value, loc, reading)


@dataclasses.dataclass(frozen=True, slots=True)
class CircuitBreakerTable:
    """``circuit_breaker = { failure_ratio = 0.5, window = "30s", min_calls = 20 }``.

    When at least ``min_calls`` handler runs in the last ``window`` failed in a proportion of
    ``failure_ratio`` or more, the consumer pauses for ``cooldown``: its backlog stays in the
    queue instead of cycling through the retry tiers."""

    failure_ratio: float = field(default=0.5, metadata=reads(ratio))
    window: int = field(default=30_000, metadata=reads(duration))
    min_calls: int = field(default=20, metadata=reads(integer(1)))
    cooldown: int = field(default=30_000, metadata=reads(duration))


@dataclasses.dataclass(frozen=True, slots=True)
class ExchangeTable:
    """``[exchanges.NAME]``."""

    type: ExchangeType = field(metadata=reads(choice(ExchangeType)))
    durable: bool = field(default=True, metadata=reads(boolean))
    auto_delete: bool = field(default=False, metadata=reads(boolean))
    internal: bool = field(default=False, metadata=reads(boolean))
    arguments: dict[str, Any] = field(default_factory=dict, metadata=reads(arguments))
    bindings: tuple[BindingTable, ...] = field(default=(), metadata=reads(tables(BindingTable)))


_ZERO_PREFETCH = (
    "prefetch 0 means unlimited, which lets the broker push the whole queue into memory; "
    "set a positive prefetch (e.g. 32)"
)
_prefetch = integer(1, 65535, zero=_ZERO_PREFETCH)


@dataclasses.dataclass(frozen=True, slots=True)
class DefaultsTable:
    """``[defaults]``: applied to every queue that does not set the key itself."""

    queue_type: QueueType = field(default="quorum", metadata=reads(choice(QueueType)))
    prefetch: int = field(default=32, metadata=reads(_prefetch))
    concurrency: int | None = field(default=None, metadata=reads(integer(1)))
    timeout: int | None = field(default=None, metadata=reads(duration))
    retry: RetryTable | None = field(
        default=RetryTable(delays=(1_000, 10_000, 60_000)), metadata=reads(retry)
    )
    dead_letter: bool = field(default=True, metadata=reads(boolean))
    crash_limit: int = field(default=10, metadata=reads(integer(1)))
    max_body_size: int = field(default=16 * 1024 * 1024, metadata=reads(size))
    immediate_retries: int = field(default=0, metadata=reads(integer(0, 10)))
    circuit_breaker: CircuitBreakerTable | None = field(
        default=None, metadata=reads(table(CircuitBreakerTable))
    )
    consumer_timeout: int | None = field(default=None, metadata=reads(duration))
    leader_locator: LeaderLocator | None = field(
        default=None, metadata=reads(choice(LeaderLocator))
    )
    initial_group_size: int | None = field(default=None, metadata=reads(integer(1)))


@dataclasses.dataclass(frozen=True, slots=True)
class QueueTable:
    """``[queues.NAME]``; unset keys inherit from ``[defaults]``."""

    queue_type: QueueType | None = field(default=None, metadata=reads(choice(QueueType)))
    durable: bool = field(default=True, metadata=reads(boolean))
    exclusive: bool = field(default=False, metadata=reads(boolean))
    auto_delete: bool = field(default=False, metadata=reads(boolean))
    bindings: tuple[BindingTable, ...] = field(default=(), metadata=reads(tables(BindingTable)))
    prefetch: int | None = field(default=None, metadata=reads(_prefetch))
    concurrency: int | None = field(default=None, metadata=reads(integer(1)))
    timeout: int | None = field(default=None, metadata=reads(duration))
    retry: RetryTable | None = field(default=None, metadata=reads(retry))
    dead_letter: bool | None = field(default=None, metadata=reads(boolean))
    crash_limit: int | None = field(default=None, metadata=reads(integer(1)))
    max_body_size: int | None = field(default=None, metadata=reads(size))
    immediate_retries: int | None = field(default=None, metadata=reads(integer(0, 10)))
    circuit_breaker: CircuitBreakerTable | None = field(
        default=None, metadata=reads(table(CircuitBreakerTable))
    )
    # Quorum placement, applied to the queue, its retry tiers and its DLQ alike.
    leader_locator: LeaderLocator | None = field(
        default=None, metadata=reads(choice(LeaderLocator))
    )
    initial_group_size: int | None = field(default=None, metadata=reads(integer(1)))
    retry_on: tuple[str, ...] = field(default=(), metadata=reads(array(string)))
    dead_letter_on: tuple[str, ...] = field(default=(), metadata=reads(array(string)))
    single_active_consumer: bool = field(default=False, metadata=reads(boolean))
    consumer_timeout: int | None = field(default=None, metadata=reads(duration))
    stream_offset: StreamOffset | None = field(default=None, metadata=reads(stream_offset))
    # Handle each message_id once (needs App(idempotency=...)).
    idempotent: bool = field(default=False, metadata=reads(boolean))
    arguments: dict[str, Any] = field(default_factory=dict, metadata=reads(arguments))


@dataclasses.dataclass(frozen=True, slots=True)
class TopologyFile:
    """The whole file."""

    broker: BrokerTable = field(default=BrokerTable(), metadata=reads(table(BrokerTable)))
    defaults: DefaultsTable = field(default=DefaultsTable(), metadata=reads(table(DefaultsTable)))
    dead_letter: DeadLetterTable = field(
        default=DeadLetterTable(), metadata=reads(table(DeadLetterTable))
    )
    exchanges: dict[str, ExchangeTable] = field(
        default_factory=dict, metadata=reads(named_tables(ExchangeTable))
    )
    queues: dict[str, QueueTable] = field(
        default_factory=dict, metadata=reads(named_tables(QueueTable))
    )


def read_file(document: dict[str, Any]) -> tuple[TopologyFile, Reading]:
    """The file as tables (refused values replaced by their defaults), and what reading found."""
    reading = Reading()
    found = read_table(TopologyFile, document, (), reading)
    return found or TopologyFile(), reading


INHERITED = frozenset(spec.name for spec in dataclasses.fields(DefaultsTable))
