"""Append-only records of handler runs, readable by the test while the worker runs."""

from __future__ import annotations

from tests.support.records import record as append_record

RECORD_ENV = "RF_RECORD"


def record(*fields: object) -> None:
    """Append one line to ``$RF_RECORD`` (see :func:`tests.support.records.record`)."""
    append_record(*fields, env=RECORD_ENV)
