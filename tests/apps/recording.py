"""Append-only records of handler runs, readable by the test while the worker runs: the apps
write them with :func:`tests.support.records.record` into ``$RF_RECORD``."""

from __future__ import annotations

from tests.support.records import RECORD_ENV, record

__all__ = ["RECORD_ENV", "record"]
