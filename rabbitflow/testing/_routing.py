"""How RabbitMQ's exchange types match a message against a binding."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any


def topic_matches(pattern: str, routing_key: str) -> bool:
    """RabbitMQ's topic match: ``*`` is exactly one word, ``#`` zero or more.

    Keys split on ``.`` into words; the empty key has no words (so ``*`` does not match it,
    ``#`` does) while ``"a."`` has two, the second one empty.
    """
    return _match(_words(pattern), _words(routing_key))


def _words(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if key else ()


@functools.lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # reachable[j]: the pattern consumed so far can end just before word j.
    reachable = [True] + [False] * len(words)
    for token in pattern:
        if token == "#":
            for j in range(1, len(reachable)):
                reachable[j] = reachable[j] or reachable[j - 1]
            continue
        shifted = [False] * len(reachable)
        for j, word in enumerate(words):
            shifted[j + 1] = reachable[j] and (token == "*" or token == word)
        reachable = shifted
    return reachable[-1]


def headers_match(arguments: Mapping[str, Any], headers: Mapping[str, Any]) -> bool:
    """A headers-exchange binding against a message's headers.

    ``x-match`` is ``all`` (the default), ``any``, ``all-with-x`` or ``any-with-x``; only the
    ``-with-x`` kinds compare binding arguments whose names start with ``x-``. A binding value
    of void (``None``) asks only for the header to be present; other values match when the
    header has the same value and the same AMQP type class (``1`` never matches ``"1"``).
    """
    kind = str(arguments.get("x-match", "all"))
    with_x = kind.endswith("-with-x")
    results = [
        _field_matches(value, headers, key)
        for key, value in arguments.items()
        if key != "x-match" and (with_x or not key.startswith("x-"))
    ]
    if kind.startswith("any"):
        return any(results)
    return all(results)


def _field_matches(expected: Any, headers: Mapping[str, Any], key: str) -> bool:
    if key not in headers:
        return False
    if expected is None:
        return True
    actual = headers[key]
    return _type_class(expected) == _type_class(actual) and expected == actual


def _type_class(value: Any) -> str:
    # RabbitMQ compares integers of any width with each other, floats likewise; other AMQP
    # field types only with their own type.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, Decimal):
        return "decimal"
    if isinstance(value, str):
        return "longstr"
    if isinstance(value, bytes | bytearray):
        return "bytes"
    if isinstance(value, datetime):
        return "timestamp"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__
