"""Read ``topology.toml`` and report every problem in it at once, each with its table path."""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from rabbitflow.errors import Problem, TopologyError, TopologySyntaxError
from rabbitflow.topology._checks import check, check_document
from rabbitflow.topology._model import Topology
from rabbitflow.topology._schema import TopologyFile

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


def load_topology(path: str | Path = "topology.toml") -> Topology:
    """Load, validate and resolve a topology file.

    Raises :class:`TopologyError` listing every problem of the file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise TopologyError(
            source, [Problem("", "file not found", "pass the path of your topology.toml")]
        ) from None
    except OSError as exc:
        raise TopologyError(
            source, [Problem("", f"cannot read the file: {exc.strerror}")]
        ) from None
    return parse_topology(raw, source)


def parse_topology(raw: bytes | str, source: str = "<string>") -> Topology:
    """Validate a topology given as TOML text."""
    document = _parse_toml(raw, source)
    # Names and references are checked on the raw document, so that a file with schema errors
    # also shows its binding to a missing exchange, instead of one round of errors per fix.
    found = check_document(document)
    try:
        parsed = TopologyFile.model_validate(document)
    except ValidationError as exc:
        raise TopologyError(source, [*(_problem(e) for e in exc.errors()), *found]) from None
    topology = Topology.from_file(source, parsed)
    problems = [*found, *check(parsed, topology)]
    if problems:
        raise TopologyError(source, problems)
    return topology


def _parse_toml(raw: bytes | str, source: str) -> dict[str, Any]:
    text = _decode(raw, source) if isinstance(raw, bytes) else raw
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        line, column = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        detail = _TOML_POSITION.sub("", message).strip()
        raise TopologySyntaxError(source, line, column, f"TOML syntax error: {detail}") from None


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise TopologySyntaxError(
            source, line, column, "the file is not valid UTF-8; save it as UTF-8"
        ) from None


def format_path(loc: Sequence[int | str]) -> str:
    """``("queues", "billing.order-created", "retry", "delays", 1)`` → TOML-style path."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            text += f".{key}" if text else key
    return text


def _problem(error: ErrorDetails) -> Problem:
    loc = error["loc"]
    path = format_path(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return Problem(path, "unknown key", _did_you_mean(loc))
    if kind == "missing":
        return Problem(path, "required key is missing")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return Problem(path, f"{error['input']!r} is not allowed; expected {expected}")
    message = error["msg"].removeprefix("Value error, ")
    return Problem(path, message)


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
