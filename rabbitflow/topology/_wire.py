"""What the AMQP client (pamqp, under aiormq and aio-pika) and RabbitMQ accept on the wire.

``topology validate`` applies these rules so that it refuses exactly what ``declare`` would.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from typing import Any

# pamqp checks every exchange and queue name of exchange.declare, queue.declare, queue.bind and
# exchange.bind against the AMQP 0-9-1 name domain before sending the frame, and raises
# ``ValueError('Invalid value for queue')`` otherwise; RabbitMQ itself would take any UTF-8.
NAME_CHARACTERS = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")
ALLOWED_FORM = "ASCII letters, digits, space and - _ . : @ # , / +"
# AMQP 0-9-1 limits exchange names to 127 characters and pamqp enforces it; queue names are
# short strings of at most 255 bytes (RabbitMQ's limit).
MAX_EXCHANGE_NAME = 127
MAX_QUEUE_NAME = 255
MAX_SHORTSTR_BYTES = 255  # routing keys: any UTF-8, at most 255 bytes
# pamqp silently truncates longer argument names, which would declare another argument.
MAX_ARGUMENT_KEY_BYTES = 128
_INT64 = (-(2**63), 2**63 - 1)


def bad_characters(name: str) -> str:
    """The characters of ``name`` the client refuses, in order and once each ('' if none)."""
    if NAME_CHARACTERS.fullmatch(name):
        return ""
    seen: dict[str, None] = {}
    for char in name:
        if not NAME_CHARACTERS.fullmatch(char):
            seen[char] = None
    return "".join(seen)


def name_problems(name: str, kind: str) -> Iterator[tuple[str, str]]:
    """``(message, hint)`` for every way ``name`` of an exchange or queue would be refused."""
    chars = bad_characters(name)
    if chars:
        shown = ", ".join(repr(c) for c in chars)
        yield (
            f"{shown} cannot be used in {kind} names: the AMQP client refuses them",
            f"use {ALLOWED_FORM}",
        )
    if kind == "exchange" and len(name) > MAX_EXCHANGE_NAME:
        yield (
            f"name is {len(name)} characters; the AMQP client allows at most {MAX_EXCHANGE_NAME}",
            "",
        )
    if kind == "queue" and len(name.encode()) > MAX_QUEUE_NAME:
        yield (f"name is {len(name.encode())} bytes; RabbitMQ allows at most {MAX_QUEUE_NAME}", "")


def value_problems(value: Any) -> Iterator[tuple[str, str]]:
    """``(relative path, message)`` for each part of an argument value that cannot be encoded
    as an AMQP field value (pamqp raises ``TypeError`` on them mid-declaration)."""
    if isinstance(value, bool | str | float | None):
        return
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            yield "", f"{value} does not fit in a signed 64-bit integer"
        return
    if isinstance(value, datetime.datetime):
        return
    if isinstance(value, datetime.date | datetime.time):
        yield "", f"a TOML {type(value).__name__} cannot be sent; use a full date-time or a string"
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            for path, message in value_problems(item):
                yield f"[{index}]{path}", message
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _key_problems(key, item)
        return
    yield "", f"{type(value).__name__} values cannot be sent"


def _key_problems(key: str, item: Any) -> Iterator[tuple[str, str]]:
    size = len(key.encode())
    if size > MAX_ARGUMENT_KEY_BYTES:
        yield f".{key[:20]}…", f"key is {size} bytes; at most {MAX_ARGUMENT_KEY_BYTES}"
    for path, message in value_problems(item):
        yield f'."{key}"{path}', message
