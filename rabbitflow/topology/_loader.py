"""Read ``topology.toml`` and report every problem in it at once, each with its table path.

Schema, reference and semantic checks run in one pass over whatever validated, and the
problems come out once each, in the order of the file."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from rabbitflow.errors import Problem, TopologyError, TopologySyntaxError
from rabbitflow.topology._checks import check, check_document
from rabbitflow.topology._model import Topology
from rabbitflow.topology._reading import read_file
from rabbitflow.topology._schema import Loc, format_path

_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")
# One step of a path as format_path writes it: ."quoted", .bare or [index].
_PATH_STEP = re.compile(r'\.?(?:"((?:[^"\\]|\\.)*)"|([^.\["]+))|\[(\d+)\]')
_HEADER = re.compile(r"^\s*\[")

__all__ = ["format_path", "load_topology", "parse_topology"]


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
    text = _decode(raw, source) if isinstance(raw, bytes) else raw
    document = _parse_toml(text, source)
    parsed, reading = read_file(document)
    topology = Topology.from_file(source, parsed)  # the checks read the resolved queues
    # Names and references are checked on the raw document and the semantic checks on every
    # table that validated, so that one bad value does not hide the other mistakes.
    problems = [
        *_problems(reading.errors),
        *check_document(document),
        *check(parsed, topology, frozenset(reading.refused)),
    ]
    if not problems and not reading.warnings:
        return topology
    position = _positions(document, text)
    warnings = tuple(_in_file_order(_problems(reading.warnings), position))
    if problems:
        raise TopologyError(source, _in_file_order(problems, position), warnings)
    return dataclasses.replace(topology, warnings=warnings)


def _problems(found: Iterable[tuple[Loc, str, str]]) -> Iterator[Problem]:
    for loc, message, hint in found:
        yield Problem(format_path(loc), message, hint)


def _in_file_order(
    problems: Iterable[Problem], position: Callable[[str], tuple[int, int]]
) -> list[Problem]:
    unique = dict.fromkeys(problems)  # one mistake found by two checks is reported once
    return sorted(unique, key=lambda problem: position(problem.path))


def _positions(document: dict[str, Any], text: str) -> Callable[[str], tuple[int, int]]:
    """Where a path is in the file: (line of its table header, rank of the key in the table).

    tomllib gives no positions; the headers are found in the text, and keys keep the order in
    which the file wrote them."""
    ranks: dict[Loc, int] = {}
    _rank(document, (), ranks)
    headers = _headers(text, ranks)

    def position(path: str) -> tuple[int, int]:
        loc = _loc(path)
        while loc and loc not in ranks:
            loc = loc[:-1]
        lines = [headers[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in headers]
        if not lines:  # a table made only of its subtables: the first of them
            lines = [min((n for h, n in headers.items() if h[: len(loc)] == loc), default=-1)]
        return lines[0], ranks.get(loc, 0)

    return position


def _rank(node: object, loc: Loc, ranks: dict[Loc, int]) -> None:
    ranks[loc] = len(ranks)
    if isinstance(node, dict):
        for name, value in node.items():
            _rank(value, (*loc, name), ranks)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _rank(value, (*loc, index), ranks)


def _headers(text: str, ranks: dict[Loc, int]) -> dict[Loc, int]:
    """The line of each ``[table]`` and ``[[array of tables]]`` header."""
    found: dict[Loc, int] = {}
    counts: dict[Loc, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not _HEADER.match(line):
            continue
        try:
            node: Any = tomllib.loads(line)
        except tomllib.TOMLDecodeError:
            continue  # a line of a multi-line array or string
        loc: Loc = ()
        while isinstance(node, dict) and len(node) == 1:
            name, node = next(iter(node.items()))
            loc = (*loc, name)
            if isinstance(node, list):  # [[name]]: the next element of the array
                index = counts[loc] = counts.get(loc, -1) + 1
                loc, node = (*loc, index), node[0]
        if loc in ranks:
            found.setdefault(loc, number)
    return found


def _loc(path: str) -> Loc:
    """format_path reversed, as far as it can be read."""
    loc: list[str | int] = []
    position = 0
    while position < len(path):
        match = _PATH_STEP.match(path, position)
        if match is None:
            break
        quoted, bare, index = match.groups()
        if index is not None:
            loc.append(int(index))
        else:
            loc.append(bare if bare is not None else quoted.replace('\\"', '"'))
        position = match.end()
    return tuple(loc)


def _parse_toml(text: str, source: str) -> dict[str, Any]:
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
