"""What handlers did: lines the test apps append to a file (they may run in a subprocess that
is killed) and runs recorded in the test's own process."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rabbitflow import Message
from tests.support.waiting import wait_until

RECORD_ENV = "RF_RECORD"


@dataclass
class Records:
    """The lines the test apps append to ``$RF_RECORD`` (see ``tests/apps/recording.py``)."""

    path: Path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line]

    def of(self, kind: str) -> list[list[str]]:
        return [fields[1:] for fields in self.lines() if fields[0] == kind]

    def ids(self, kind: str) -> Counter[str]:
        """How many times each id (the first field after ``kind``) was recorded."""
        return Counter(fields[0] for fields in self.of(kind))

    def wait_for(self, kind: str, count: int, timeout: float) -> list[list[str]]:
        def enough() -> list[list[str]] | None:
            found = self.of(kind)
            return found if len(found) >= count else None

        return wait_until(enough, timeout, f"{count} {kind!r} records")


def record(*fields: object, env: str = RECORD_ENV) -> None:
    """Append one line to the file ``$env`` names.

    One ``write`` on an ``O_APPEND`` descriptor: lines from concurrent handlers (threads
    included) never interleave, and a line is in the file once ``write`` returns, even if the
    process is killed (or calls ``os._exit``) right after.
    """
    line = " ".join(str(f) for f in fields) + "\n"
    fd = os.open(os.environ[env], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Run:
    """One handler run as the handler saw it."""

    at: float
    message_id: str | None
    attempt: int
    redelivered: bool
    headers: dict[str, Any]


@dataclass
class Runs:
    """Every handler run of a test, in order."""

    runs: list[Run] = field(default_factory=list)

    def add(self, message: Message) -> Run:
        run = Run(
            time.monotonic(),
            message.message_id,
            message.attempt,
            message.redelivered,
            message.headers,
        )
        self.runs.append(run)
        return run

    def of(self, message_id: str) -> list[Run]:
        return [run for run in self.runs if run.message_id == message_id]

    def count(self, message_id: str) -> int:
        return len(self.of(message_id))
