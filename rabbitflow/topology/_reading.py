"""A topology document read against the schema: every error worded with its fix, the tables
that validated, and the warnings.

pydantic reports every error of the document at once. The refused values are then taken out
of a copy of the document (a key falls back to its default, a table that lacks a required key
is left out, an array with a bad item is left out whole, so that no index shifts) and the copy
is validated again: the semantic checks see every table that is right, and
:attr:`Reading.refused` tells them which values are not the user's."""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from rabbitflow.topology._schema import (
    DURATION_MARKER,
    Invalid,
    Loc,
    TopologyFile,
    a_kind,
    shown,
)

# Each round removes what failed in the one before, one level of nesting at least.
_ROUNDS = 8
# Below a second, an integer duration is almost always seconds written without their unit.
_SUSPICIOUS_MS = 1000
_TRUE_WORDS = frozenset({"true", "yes", "on", "1", "y", "t"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0", "n", "f"})
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*")
_QUOTED = re.compile(r"'([^']*)'")
# (the value, the key's name, the error's context, its location) -> (message, hint)
Wording = Callable[[Any, str, dict[str, Any], Sequence[str | int]], tuple[str, str]]
_EMPTY = {
    "delays": "no delays; write retry = false to turn retries off",
    "urls": 'urls = [] names no node; write urls = ["amqp://host:5672/"]',
}


class Reading:
    """What reading a document found: errors and warnings as ``(loc, message, hint)``, and the
    locations of the values the schema refused."""

    def __init__(self) -> None:
        self.errors: list[tuple[Loc, str, str]] = []
        self.warnings: list[tuple[Loc, str, str]] = []
        self.refused: set[Loc] = set()


def read_file(document: dict[str, Any]) -> tuple[TopologyFile, Reading]:
    """The file's tables (what was refused left at its default or out), and what was found."""
    reading = Reading()
    _warn_bare_milliseconds(TopologyFile, document, (), reading)
    try:
        return TopologyFile.model_validate(document), reading
    except ValidationError as exc:
        errors = exc.errors()
    pruned = copy.deepcopy(document)
    removed: set[Loc] = set()
    for _ in range(_ROUNDS):
        for target in [_refuse(error, reading, removed) for error in errors]:
            _remove(pruned, target)
        try:
            return TopologyFile.model_validate(pruned), reading
        except ValidationError as exc:
            errors = exc.errors()
    return TopologyFile(), reading  # not reached: every round removes what failed


def _refuse(error: ErrorDetails, reading: Reading, removed: set[Loc]) -> Loc:
    """Report ``error`` (unless it only follows from a removal) and say what to remove."""
    loc = tuple(error["loc"])
    missing = error["type"] == "missing"
    if not (missing and loc in removed):
        reading.errors.append((loc, *_worded(error)))
    if error["type"] != "extra_forbidden":
        reading.refused.add(loc)
    target = _outside_arrays(loc[:-1] if missing else loc)
    removed.add(target)
    reading.refused.add(target)
    return target


def _outside_arrays(loc: Loc) -> Loc:
    for index, part in enumerate(loc):
        if isinstance(part, int):
            return loc[:index]
    return loc


def _remove(document: dict[str, Any], loc: Loc) -> None:
    parent: Any = document
    for part in loc[:-1]:
        parent = parent.get(part) if isinstance(parent, dict) else None
    if loc and isinstance(parent, dict):
        parent.pop(loc[-1], None)


# --- wording -------------------------------------------------------------------------------


def _worded(error: ErrorDetails) -> tuple[str, str]:
    """``(message, hint)`` for a pydantic error: the value, what is wrong, the line to write."""
    kind, value = error["type"], error.get("input")
    loc = error["loc"]
    name = next((part for part in reversed(loc) if isinstance(part, str)), "")
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    cause = ctx.get("error")
    if isinstance(cause, Invalid):
        return cause.message, cause.hint
    if kind in _WORDING:
        return _WORDING[kind](value, name, ctx, loc)
    return error["msg"].removeprefix("Value error, "), ""


def _type_error(expected: str, fix: Callable[[Any, str], str] | None = None) -> Wording:
    def word(
        value: Any, name: str, ctx: dict[str, Any], loc: Sequence[str | int]
    ) -> tuple[str, str]:
        return f"{shown(value)} is {a_kind(value)}, not {expected}", fix(value, name) if fix else ""

    return word


def _boolean_fix(value: Any, name: str) -> str:
    word = str(value).strip().lower() if isinstance(value, str | int | float) else ""
    guess = "true" if word in _TRUE_WORDS else "false" if word in _FALSE_WORDS else ""
    if not guess:
        return f"write {name} = true or {name} = false"
    return f"write {name} = {guess}" + (", without quotes" if isinstance(value, str) else "")


def _integer_fix(value: Any, name: str) -> str:
    if isinstance(value, float):
        return f"write {name} = {int(value)}" if value.is_integer() else "write a whole number"
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return f"write {name} = {int(value)}, without quotes"
    return ""


def _number_fix(value: Any, name: str) -> str:
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return f"write {name} = {value.strip()}, without quotes"
    return ""


def _string_fix(value: Any, name: str) -> str:
    return f'write {name} = "{shown(value)}"' if isinstance(value, int | float) else ""


def _literal(
    value: Any, name: str, ctx: dict[str, Any], loc: Sequence[str | int]
) -> tuple[str, str]:
    expected = str(ctx.get("expected", ""))
    allowed = _QUOTED.findall(expected)
    close = difflib.get_close_matches(value.lower(), allowed, n=1) if isinstance(value, str) else []
    return f"{shown(value)} is not allowed; expected {expected}", (
        f"did you mean {close[0]!r}?" if close else ""
    )


def _extra(value: Any, name: str, ctx: dict[str, Any], loc: Sequence[str | int]) -> tuple[str, str]:
    return "unknown key", _did_you_mean(loc)


_WORDING: dict[str, Wording] = {
    "extra_forbidden": _extra,
    "missing": lambda value, name, ctx, loc: ("required key is missing", ""),
    "bool_type": _type_error("true or false", _boolean_fix),
    "int_type": _type_error("an integer", _integer_fix),
    "float_type": _type_error("a number", _number_fix),
    "string_type": _type_error("a string", _string_fix),
    "list_type": _type_error("an array"),
    "dict_type": _type_error("a table"),
    "model_type": _type_error("a table"),
    "literal_error": _literal,
    "greater_than_equal": lambda value, name, ctx, loc: (
        f"{value} is below the minimum, {_number(ctx['ge'])}",
        "",
    ),
    "less_than_equal": lambda value, name, ctx, loc: (
        f"{value} is over the maximum, {_number(ctx['le'])}",
        "",
    ),
    "greater_than": lambda value, name, ctx, loc: (
        f"{value} must be above {_number(ctx['gt'])}",
        "",
    ),
    "too_short": lambda value, name, ctx, loc: (_EMPTY.get(name, f"{name} is empty"), ""),
}


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _did_you_mean(loc: Sequence[int | str]) -> str:
    keys = _keys_at(TopologyFile, list(loc[:-1]))
    matches = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    if matches:
        return f'did you mean "{matches[0]}"?'
    return "valid keys: " + ", ".join(sorted(keys)) if keys else ""


def _keys_at(model: type[BaseModel], loc: list[int | str]) -> list[str]:
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    target = _model_in(annotation)
    return list(target.model_fields) if target else []


def _step(annotation: Any, part: int | str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        return typing.get_args(annotation)[-1]
    model = _model_in(annotation)
    if model is None or not isinstance(part, str) or part not in model.model_fields:
        return None
    return model.model_fields[part].annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None


# --- warnings ------------------------------------------------------------------------------


def _warn_bare_milliseconds(
    model: type[BaseModel], raw: object, loc: Loc, reading: Reading
) -> None:
    """Warn of each duration written as an integer under 1000: ``timeout = 30`` is 30 ms."""
    if not isinstance(raw, dict):
        return
    for name, value in raw.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        if _is_duration(field):
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for index, item in items:
                where = (*loc, name) if index is None else (*loc, name, index)
                _warn_if_bare(item, where, reading)
        else:
            _warn_inside(field.annotation, value, (*loc, name), reading)


def _warn_inside(annotation: Any, value: object, loc: Loc, reading: Reading) -> None:
    origin = typing.get_origin(annotation)
    if origin is dict and isinstance(value, dict):
        model = _model_in(typing.get_args(annotation)[-1])
        for key, item in value.items() if model else ():
            _warn_bare_milliseconds(model, item, (*loc, key), reading)  # type: ignore[arg-type]
        return
    model = _model_in(annotation)
    if model is not None:
        _warn_bare_milliseconds(model, value, loc, reading)


def _is_duration(field: FieldInfo) -> bool:
    return DURATION_MARKER in field.metadata or _marked(field.annotation)


def _marked(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return any(arg is DURATION_MARKER or _marked(arg) for arg in args)


def _warn_if_bare(value: object, loc: Loc, reading: Reading) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _SUSPICIOUS_MS:
        reading.warnings.append(
            (
                loc,
                f'{value} ms; did you mean "{value}s"?',
                f'an integer is milliseconds; write "{value}s", or "{value}ms" to keep {value} ms',
            )
        )
