"""The console's pages and actions (docs/console.md)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from rabbitflow import dlq as ops
from rabbitflow._duration import parse_duration
from rabbitflow.console._actions import in_group, run_purge, run_replay
from rabbitflow.console._groups import (
    NO_ERROR_TYPE,
    NO_ERROR_TYPE_FILTER,
    Filters,
    group_by_error,
    message_key,
)
from rabbitflow.console._inventory import read_overview
from rabbitflow.console._jobs import job_routes
from rabbitflow.console._outbox import outbox_page
from rabbitflow.console._reads import DEFAULT_LIMIT, broker_version, reads_are_counted, reads_left
from rabbitflow.console._state import Console
from rabbitflow.errors import RabbitflowError

Endpoint = Callable[[Request], Awaitable[Response]]
SCOPES = ("group", "selected", "all")
REUSE_READ = 60.0


def build(console: Console) -> list[BaseRoute]:
    """The routes; ``--read-only`` leaves the two POST routes out altogether."""
    pages: list[BaseRoute] = [
        Route("/", _bind(console, overview)),
        Route("/queues", _bind(console, queue_rows)),
        Route("/outbox", _bind(console, outbox_page)),
        # The message is named in the query: a message_id may hold any character, and a
        # "/" in a path segment is a separator even when escaped (ASGI decodes %2F).
        Route("/dlq/{queue:path}/message", _bind(console, message_page)),
        Route("/dlq/{queue:path}/message/{key}", _bind(console, message_page)),  # older links
        Route("/dlq/{queue:path}", _bind(console, dlq_page)),
        *job_routes(console),
    ]
    if console.settings.read_only:
        return pages
    return [
        Route("/actions/replay/{queue:path}", _bind(console, replay), methods=["POST"]),
        Route("/actions/purge/{queue:path}", _bind(console, purge), methods=["POST"]),
        *pages,
    ]


def exception_handlers(console: Console) -> dict[Any, Any]:
    async def broker_error(request: Request, exc: Exception) -> Response:
        return console.templates.TemplateResponse(
            request, "error.html", {"message": str(exc)}, status_code=502
        )

    return {RabbitflowError: broker_error}


def _bind(console: Console, view: Callable[[Console, Request], Awaitable[Response]]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await view(console, request)

    return endpoint


async def overview(console: Console, request: Request) -> Response:
    context = await _overview_context(console)
    context["diagram"] = console.diagram
    return console.templates.TemplateResponse(request, "overview.html", context)


async def queue_rows(console: Console, request: Request) -> Response:
    context = await _overview_context(console)
    return console.templates.TemplateResponse(request, "_queues.html", context)


async def _overview_context(console: Console) -> dict[str, Any]:
    now = datetime.now(UTC)
    unacked: dict[str, int] | None = None
    held: dict[str, int] | None = None
    problem: str | None = "no count without --management-url (the RabbitMQ management plugin)"
    if console.management is not None:
        answer = await console.management.unacked()
        problem = answer.problem
        unacked, held = (None, None) if problem else (answer.counts, answer.held)
    connection = await console.link.get()
    rows = await read_overview(connection, console.settings.topology, unacked, now, held)
    return {"rows": rows, "now": now, "unacked_problem": problem}


def _queue(console: Console, request: Request) -> str:
    queue = str(request.path_params["queue"]).removesuffix(ops.DLQ_SUFFIX)
    if queue not in console.dead_lettered():
        raise HTTPException(404, f"{queue!r} is not a queue of the topology with a DLQ")
    return queue


def _filters(request: Request) -> Filters:
    params = request.query_params

    def seconds(name: str) -> float | None:
        value = params.get(name, "").strip()
        if not value:
            return None
        try:
            return parse_duration(value) / 1000
        except ValueError:
            raise HTTPException(400, f"{name}: {value!r} is not a duration like 5m or 2h") from None

    error_type = params.get("error_type") or None
    if error_type == NO_ERROR_TYPE_FILTER:
        error_type = NO_ERROR_TYPE
    return Filters(
        error_type=error_type,
        older_than=seconds("older_than"),
        newer_than=seconds("newer_than"),
        text=params.get("text", "").strip() or None,
    )


async def _peek(console: Console, queue: str, *, fresh: bool = True) -> ops.Peek:
    """The DLQ's first messages: read now, or (``fresh=False``) as read less than
    ``REUSE_READ`` seconds ago."""
    kept = console.reads.get(queue)
    if not fresh and kept is not None and time.monotonic() - kept[0] < REUSE_READ:
        return kept[1]
    connection = await console.link.get()
    async with console.dlq_lock:
        seen = await ops.peek(connection, queue, limit=console.settings.limit)
    console.reads[queue] = (time.monotonic(), seen)
    return seen


async def _reads_left(console: Console, queue: str, seen: ops.Peek) -> int | None:
    """How many more reads the most-read message survives, where reads are counted."""
    connection = await console.link.get()
    arguments = console.dlq_arguments(queue)
    queue_type = str(arguments.get("x-queue-type", "classic"))
    if not reads_are_counted(broker_version(connection), queue_type, arguments):
        return None
    return min((reads_left(m.headers) for m in seen.messages), default=DEFAULT_LIMIT)


async def dlq_page(console: Console, request: Request) -> Response:
    queue = _queue(console, request)
    filters = _filters(request)
    now = datetime.now(UTC)
    seen = await _peek(console, queue)
    shown = [m for m in seen.messages if filters.keep(m, now)]
    every = Filters(older_than=filters.older_than, newer_than=filters.newer_than, text=filters.text)
    groups = group_by_error((m for m in seen.messages if every.keep(m, now)), now)
    result = console.results.get(request.query_params.get("result", ""))
    context = {
        "queue": queue,
        "seen": seen,
        "groups": groups,
        "shown": shown,
        "filters": filters,
        "now": now,
        "key": message_key,
        "result": result[1] if result and result[0] == queue else None,
        "reads_left": await _reads_left(console, queue, seen),
    }
    return console.templates.TemplateResponse(request, "dlq.html", context)


async def message_page(console: Console, request: Request) -> Response:
    queue = _queue(console, request)
    key = request.query_params.get("key") or str(request.path_params.get("key", ""))
    seen = await _peek(console, queue, fresh=False)
    found = next((m for m in seen.messages if message_key(m) == key), None)
    if found is None:
        raise HTTPException(
            404, f"no message {key} among the first {len(seen.messages)} of the DLQ"
        )
    context = {"queue": queue, "message": found, "now": datetime.now(UTC), "key": message_key}
    return console.templates.TemplateResponse(request, "message.html", context)


async def replay(console: Console, request: Request) -> Response:
    queue = _queue(console, request)
    form = await request.form()
    _check_csrf(console, request, str(form.get("csrf", "")))
    scope = str(form.get("scope", ""))
    if scope not in SCOPES:
        raise HTTPException(400, f"scope must be one of {', '.join(SCOPES)}")
    error_type = str(form.get("error_type", ""))
    keys = frozenset(str(k) for k in form.getlist("key"))
    if scope == "selected" and not keys:
        raise HTTPException(400, "select at least one message")
    if form.get("confirm") != "yes":
        count, at_least = await _replay_count(console, queue, scope, error_type, keys)
        context = {
            "queue": queue,
            "action": "replay",
            "scope": scope,
            "error_type": error_type,
            "keys": sorted(keys),
            "count": count,
            "at_least": at_least,
            "read": console.settings.limit,
        }
        return console.templates.TemplateResponse(request, "confirm.html", context)
    connection = await console.link.get()
    async with console.dlq_lock:
        outcome = await run_replay(
            connection,
            queue,
            scope,
            error_type=error_type,
            keys=keys,
            client=_client(request),
            jobs=console.settings.jobs,
        )
    return _done(console, queue, outcome)


async def purge(console: Console, request: Request) -> Response:
    queue = _queue(console, request)
    form = await request.form()
    _check_csrf(console, request, str(form.get("csrf", "")))
    connection = await console.link.get()
    if form.get("confirm") != "yes":
        count = await ops.ready_count(connection, ops.queue_names(queue)[1])
        context = {"queue": queue, "action": "purge", "scope": "all", "count": count}
        return console.templates.TemplateResponse(request, "confirm.html", context)
    async with console.dlq_lock:
        outcome = await run_purge(connection, queue, client=_client(request))
    return _done(console, queue, outcome)


async def _replay_count(
    console: Console, queue: str, scope: str, error_type: str, keys: frozenset[str]
) -> tuple[int, bool]:
    """How many messages the replay would move, and whether that is a lower bound (the DLQ
    holds more than the console reads)."""
    if scope == "selected":
        return len(keys), False
    connection = await console.link.get()
    if scope == "all":
        return await ops.ready_count(connection, ops.queue_names(queue)[1]), False
    seen = await _peek(console, queue, fresh=False)
    count = sum(1 for m in seen.messages if in_group(m, error_type))
    return count, len(seen.messages) < seen.count


def _check_csrf(console: Console, request: Request, submitted: str) -> None:
    if not console.guard.csrf_ok(request, submitted):
        raise HTTPException(403, "cross-site request refused: reload the console page and retry")


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _done(console: Console, queue: str, outcome: Any) -> Response:
    console.reads.pop(queue, None)
    key = console.remember(queue, outcome)
    return RedirectResponse(f"/dlq/{quote(queue, safe='')}?result={key}", status_code=303)
