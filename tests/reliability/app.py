"""The worker the reliability suite runs: ``rabbitflow run tests.reliability.app:app``.

One consumer on the queue ``work`` (the topology comes from ``--topology``): ``app`` has an
async handler, ``sync_app`` a plain ``def`` one (run in rabbitflow's thread pool). The body is
a :class:`Job`; its ``action`` says how the run ends, so that one worker serves every fault.

Every run is recorded durably in the SQLite file ``$RF_REL_DB`` (table ``runs``, created by
:class:`tests.reliability.checker.Records`): one ``start`` row when the handler is entered and
one ``done`` row just before it returns, each with the message id, the process id, whether the
broker flagged the delivery ``redelivered``, and ``message.attempt``. Rows are committed one by
one in WAL mode, so a row is on disk before the handler returns and survives a ``kill -9``.

Environment:
- ``RF_REL_DB``: the SQLite file (required).
- ``RF_REL_SLEEP``: seconds every run sleeps unless the body says otherwise (default 0).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from rabbitflow import App, Message, Reject

DB_ENV = "RF_REL_DB"
SLEEP_ENV = "RF_REL_SLEEP"
QUEUE = "work"

Action = Literal["ok", "fail", "reject", "exit", "systemexit", "keyboardinterrupt", "hang"]


class Job(BaseModel):
    """The body of every message of the suite. Unknown fields are refused (a bad input)."""

    model_config = ConfigDict(extra="forbid")

    id: int
    action: Action = "ok"
    sleep: float | None = None  # overrides $RF_REL_SLEEP
    sleep_first: float = 0.0  # extra sleep on a first delivery only (not redelivered, attempt 1)
    pad: str = ""  # makes bodies as large as a test needs


_local = threading.local()


def _db() -> sqlite3.Connection:
    connection: sqlite3.Connection | None = getattr(_local, "db", None)
    if connection is None:
        # One connection per thread: sync handlers record from rabbitflow's thread pool.
        connection = sqlite3.connect(os.environ[DB_ENV], timeout=30, isolation_level=None)
        connection.execute("PRAGMA synchronous=NORMAL")
        _local.db = connection
    return connection


def record(phase: str, message: Message, body_id: int | None) -> None:
    """One committed row: a WAL commit survives the process being killed right after."""
    if body_id is not None and not -(2**63) <= body_id < 2**63:
        body_id = None  # a huge id from the bad-input tests: more than SQLite can store
    _db().execute(
        "INSERT INTO runs (key, body_id, pid, redelivered, attempt, phase, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            message.message_id or "",
            body_id,
            os.getpid(),
            int(message.redelivered),
            message.attempt,
            phase,
            time.time(),
        ),
    )


def _seconds(job: Job, message: Message) -> float:
    base = job.sleep if job.sleep is not None else float(os.environ.get(SLEEP_ENV, "0"))
    first = job.sleep_first if message.attempt == 1 and not message.redelivered else 0.0
    return base + first


def _fail(job: Job) -> None:
    """Raise (or die) as ``job.action`` says; return for ``ok``."""
    if job.action == "fail":
        raise RuntimeError(f"job {job.id} always fails")
    if job.action == "reject":
        raise Reject(f"job {job.id} is refused")
    if job.action == "exit":
        os._exit(3)  # as a segfault or the OOM killer would: no exception, no ack
    if job.action == "systemexit":
        raise SystemExit(f"job {job.id} called sys.exit")
    if job.action == "keyboardinterrupt":
        raise KeyboardInterrupt


app = App(name="rf-reliability")
sync_app = App(name="rf-reliability-sync")


@app.consumer(QUEUE)
async def handle(job: Job, message: Message) -> None:
    record("start", message, job.id)
    if job.action == "hang":
        await asyncio.Event().wait()
    _fail(job)
    await asyncio.sleep(_seconds(job, message))
    record("done", message, job.id)


@sync_app.consumer(QUEUE)
def handle_sync(job: Job, message: Message) -> None:
    record("start", message, job.id)
    _fail(job)
    time.sleep(_seconds(job, message))
    record("done", message, job.id)
