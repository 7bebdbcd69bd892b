"""The console's actions: replay (a group, selected messages, all) and purge.

Each runs the code of ``rabbitflow dlq`` (:mod:`rabbitflow.dlq`): a copy is published with
confirms and the DLQ message acked only once the broker has confirmed it, so a console that
dies halfway leaves every message in the DLQ, in the work queue, or (at worst) in both.
Every action writes one audit log line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractConnection

from rabbitflow import dlq as ops
from rabbitflow._format import render_replay
from rabbitflow._logging import get_logger
from rabbitflow.console._groups import NO_ERROR_TYPE, message_key
from rabbitflow.errors import RabbitflowError
from rabbitflow.job import JobBook

audit = get_logger("rabbitflow.console.audit")


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result line of one action, and whether it did all it was asked."""

    line: str
    ok: bool


async def replay_where(
    connection: AbstractConnection,
    queue: str,
    wanted: Callable[[ops.DeadLetter], bool],
    limit: int | None = None,
    jobs: JobBook | None = None,
) -> ops.ReplayReport:
    """:func:`rabbitflow.dlq.replay` of the messages ``wanted`` picks: the DLQ is read in
    order without taking anything, a picked message is published (confirmed, mandatory) to
    the work queue and only then acked; the others stay in their places."""
    return await ops.replay(connection, queue, limit=limit, select=wanted, jobs=jobs)


async def replay_group(
    connection: AbstractConnection, queue: str, error_type: str, jobs: JobBook | None = None
) -> ops.ReplayReport:
    """Replay every message of one error group (``""``: those without an error type).

    The group is the exact error type: ``rabbitflow dlq replay --error-type KeyError`` also
    takes ``app.errors.KeyError`` (a bare name matches any module), a group does not."""
    return await replay_where(connection, queue, lambda m: in_group(m, error_type), jobs=jobs)


def in_group(letter: ops.DeadLetter, error_type: str) -> bool:
    """Whether ``letter`` belongs to the group of ``error_type`` (see :func:`group_by_error`)."""
    return (letter.error_type or NO_ERROR_TYPE) == error_type


async def replay_selected(
    connection: AbstractConnection,
    queue: str,
    keys: frozenset[str],
    jobs: JobBook | None = None,
) -> ops.ReplayReport:
    """Replay the messages named by ``keys`` (see :func:`message_key`)."""
    return await replay_where(
        connection, queue, lambda m: message_key(m) in keys, limit=len(keys), jobs=jobs
    )


async def run_replay(
    connection: AbstractConnection,
    queue: str,
    scope: str,
    *,
    error_type: str = NO_ERROR_TYPE,
    keys: frozenset[str] = frozenset(),
    client: str = "",
    jobs: JobBook | None = None,
) -> Outcome:
    """Replay ``scope`` (``group``, ``selected`` or ``all``) and write the audit line; with
    ``jobs`` the job of each message moved is queued again."""
    try:
        if scope == "group":
            report = await replay_group(connection, queue, error_type, jobs)
        elif scope == "selected":
            report = await replay_selected(connection, queue, keys, jobs)
        else:
            report = await ops.replay(connection, queue, jobs=jobs)
    except RabbitflowError as exc:
        return _failed("replay", queue, scope, exc, client, error_type=error_type)
    left = report.count - report.moved
    line = next(iter(render_replay(report, None)))
    audit.info(
        "console action",
        action="replay",
        scope=scope,
        queue=report.queue,
        dlq=report.dlq,
        error_type=error_type if scope == "group" else None,
        selected=len(keys) if scope == "selected" else None,
        moved=report.moved,
        left=left,
        client=client,
    )
    wanted = len(keys) if scope == "selected" else None
    return Outcome(line, wanted is None or report.moved == wanted)


async def run_purge(connection: AbstractConnection, queue: str, client: str = "") -> Outcome:
    """Purge the DLQ of ``queue`` and write the audit line."""
    _, dlq = ops.queue_names(queue)
    try:
        removed = await ops.purge(connection, queue)
    except RabbitflowError as exc:
        return _failed("purge", queue, "all", exc, client)
    audit.info(
        "console action", action="purge", queue=queue, dlq=dlq, purged=removed, client=client
    )
    return Outcome(f"purged {removed} message{'s' if removed != 1 else ''} from {dlq}", True)


def _failed(
    action: str, queue: str, scope: str, exc: RabbitflowError, client: str, **extra: object
) -> Outcome:
    audit.warning(
        "console action failed",
        action=action,
        scope=scope,
        queue=queue,
        error=str(exc),
        client=client,
        **extra,
    )
    return Outcome(f"error: {exc}", False)
