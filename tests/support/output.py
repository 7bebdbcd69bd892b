"""What rabbitflow prints, read back: Prometheus text, JSON log lines, message bodies."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Any

import structlog

from rabbitflow import Message

_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(name, labels): value}`` of every sample in a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def forget_cached_loggers() -> None:
    """Make rabbitflow's module loggers pick up the current structlog configuration again.

    ``configure_logging`` sets ``cache_logger_on_first_use``: a module-level logger keeps the
    stream it first wrote to, which in a test is pytest's capture of that test only.
    """
    for name, module in list(sys.modules.items()):
        if name == "rabbitflow" or name.startswith(("rabbitflow.", "tests.")):
            for value in list(vars(module).values()):
                if isinstance(value, structlog._config.BoundLoggerLazyProxy):
                    vars(value).pop("bind", None)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


def body_of(message: Message) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(message.body)
    return value


def text(value: object) -> str:
    """A header value as str (the AMQP client may hand long strings over as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
