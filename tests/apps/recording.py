"""Append-only records of handler runs, readable by the test while the worker runs."""

from __future__ import annotations

import os

RECORD_ENV = "RF_RECORD"


def record(*fields: object) -> None:
    """Append one line to ``$RF_RECORD``.

    One ``write`` on an ``O_APPEND`` descriptor: lines from concurrent handlers (threads
    included) never interleave, and a line is in the file once ``write`` returns, even if the
    process is killed right after.
    """
    line = " ".join(str(field) for field in fields) + "\n"
    fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
