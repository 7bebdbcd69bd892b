"""``rabbitflow dlq list|replay|purge``: the dead-letter queue runbook (docs/dlq.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from aio_pika.abc import AbstractConnection
from click.core import ParameterSource

from rabbitflow import _headers as h
from rabbitflow import dlq as ops
from rabbitflow._format import count_messages as _messages
from rabbitflow._format import error_text as _error
from rabbitflow._format import format_age, render_replay
from rabbitflow._held import Held, note, read_held
from rabbitflow.cli import amqp_name, reports_errors
from rabbitflow.cli._urls import broker_urls, url_options
from rabbitflow.connection import connect
from rabbitflow.errors import ConfigurationError, QueueNotFoundError
from rabbitflow.topology import Topology, derive, load_topology
from rabbitflow.topology._management import MANAGEMENT_URL_ENV

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., object])


@click.group()
def dlq() -> None:
    """Inspect, replay and purge dead-letter queues.

    QUEUE is the work queue; its dead-letter queue is QUEUE.dlq (the .dlq name is accepted
    too)."""


def broker_options(func: F) -> F:
    """``--url`` and ``--topology``, shared by every ``dlq`` command."""
    func = click.option(
        "--topology",
        "topology_file",
        default="topology.toml",
        show_default=True,
        type=click.Path(dir_okay=False),
        help="Topology file, for [broker].url; optional: skipped when the default is missing.",
    )(func)
    return url_options(func)


def list_options(limit_help: str) -> Callable[[F], F]:
    """``QUEUE``, ``--limit``, ``--json`` and the broker options of a read-only listing
    (``dlq list``, ``retries list``); ``limit_help`` says what ``--limit`` counts."""

    def decorate(func: F) -> F:
        func = broker_options(reports_errors(func))  # type: ignore[assignment]  # wraps keeps F
        func = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(
            func
        )
        func = click.option(
            "--management-url",
            envvar=MANAGEMENT_URL_ENV,
            metavar="URL",
            help="RabbitMQ's management API, to count messages held by the broker's "
            "dead-lettering (default: port 15672 of the broker's host, with the broker "
            f"URL's user; env {MANAGEMENT_URL_ENV}).",
        )(func)
        func = click.option(
            "--limit", type=click.IntRange(min=0), default=10, show_default=True, help=limit_help
        )(func)
        return click.argument("queue", callback=amqp_name("queue"))(func)

    return decorate


@dlq.command("list")
@list_options("How many messages to show, from the head of the DLQ.")
def list_command(
    queue: str,
    limit: int,
    as_json: bool,
    management_url: str | None,
    url: tuple[str, ...],
    url_order: str,
    topology_file: str,
) -> None:
    """Show how many messages QUEUE.dlq holds and the first ones, leaving it unchanged.

    Also counts the messages the broker's dead-lettering holds on their way to QUEUE.dlq
    (from the management API): dead-lettered by a quorum QUEUE but refused by the DLQ."""
    broker = Broker.resolve(url, topology_file, url_order)
    seen = broker.run(queue, "rabbitflow dlq list", lambda c: ops.peek(c, queue, limit=limit))
    held = broker.held(management_url)
    now = datetime.now(UTC)
    if as_json:
        document = seen.to_json(now)
        document["held_by_broker"] = held_json(held, [seen.queue, seen.dlq])
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        lines = list(render_peek(seen, now))
        lines[1:1] = [f"  {line}" for line in note(held, [seen.queue, seen.dlq])]
        click.echo("\n".join(lines))


@dlq.command("replay")
@click.argument("queue", callback=amqp_name("queue"))
@click.option(
    "--limit", type=click.IntRange(min=1), help="Move at most N messages (default: all of them)."
)
@click.option(
    "--error-type",
    metavar="NAME",
    help="Only messages that failed with this exception (qualified or bare class name).",
)
@click.option("--dry-run", is_flag=True, help="Change nothing; print what would move.")
@click.option(
    "--jobs",
    "jobs_url",
    metavar="URL",
    envvar="RABBITFLOW_JOBS",
    help="The job store (redis:// or postgresql://): each job replayed is queued again "
    "[env: RABBITFLOW_JOBS].",
)
@click.option(
    "--jobs-prefix",
    metavar="NAME",
    help="The job store's Redis key prefix or PostgreSQL table, if not the default.",
)
@broker_options
@reports_errors
def replay_command(
    queue: str,
    limit: int | None,
    error_type: str | None,
    dry_run: bool,
    jobs_url: str | None,
    jobs_prefix: str | None,
    url: tuple[str, ...],
    url_order: str,
    topology_file: str,
) -> None:
    """Move messages from QUEUE.dlq back to QUEUE, oldest first.

    A message is acked in the DLQ only after the broker confirmed its copy in QUEUE."""
    broker = Broker.resolve(url, topology_file, url_order)

    async def replay(connection: AbstractConnection) -> ops.ReplayReport:
        if jobs_url is None or dry_run:
            return await ops.replay(
                connection, queue, limit=limit, error_type=error_type, dry_run=dry_run
            )
        from rabbitflow.jobs._open import open_book

        book = open_book(jobs_url, prefix=jobs_prefix)
        try:
            return await ops.replay(
                connection, queue, limit=limit, error_type=error_type, jobs=book
            )
        finally:
            await book.close()

    report = broker.run(queue, "rabbitflow dlq replay", replay)
    click.echo("\n".join(render_replay(report, error_type)))


@dlq.command("purge")
@click.argument("queue", callback=amqp_name("queue"))
@click.option("--yes", is_flag=True, help="Confirm: the messages are deleted for good.")
@broker_options
@reports_errors
def purge_command(
    queue: str, yes: bool, url: tuple[str, ...], url_order: str, topology_file: str
) -> None:
    """Delete every message of QUEUE.dlq. Needs --yes."""
    _, dead = ops.queue_names(queue)
    if not yes:
        raise click.UsageError(f"purge deletes every message in {dead} for good; pass --yes")
    broker = Broker.resolve(url, topology_file, url_order)
    removed = broker.run(queue, "rabbitflow dlq purge", lambda c: ops.purge(c, queue))
    click.echo(f"purged {_messages(removed)} from {dead}")


@dataclass(frozen=True, slots=True)
class Broker:
    """Where the ``dlq`` commands connect, and the topology file if there is one."""

    url: list[str]
    topology: Topology | None

    @classmethod
    def resolve(cls, url: tuple[str, ...], topology_file: str, url_order: str) -> Broker:
        """``--url``, else ``RABBITFLOW_URL``, else the file's ``[broker].url``, else the default.

        The default file may be missing; a file named with ``--topology`` may not."""
        path = Path(topology_file)
        if not path.exists():
            source = click.get_current_context().get_parameter_source("topology_file")
            if source is not ParameterSource.DEFAULT:
                raise ConfigurationError(f"topology file {topology_file} does not exist")
            return cls(broker_urls(url, None, url_order), None)
        topology = load_topology(path)
        return cls(broker_urls(url, topology.broker_urls, url_order), topology)

    def run(
        self, queue: str, name: str, operation: Callable[[AbstractConnection], Awaitable[T]]
    ) -> T:
        """Run ``operation`` on a connection of its own, explaining a missing DLQ."""
        try:
            return asyncio.run(_connected(self.url, name, operation))
        except QueueNotFoundError as exc:
            raise self._explained(exc, queue) from None

    def held(self, management_url: str | None) -> Held:
        """What the broker's dead-lettering holds in each queue of the vhost."""
        return asyncio.run(read_held(self.url[0], management_url))

    def _explained(self, exc: QueueNotFoundError, queue: str) -> QueueNotFoundError:
        work, dead = ops.queue_names(queue)
        if self.topology is None or exc.queue != dead:
            return exc
        route = derive(self.topology).routes.get(work)
        if route is not None and route.dead_letter_exchange is None:
            hint = f"{work!r} has dead_letter = false in {self.topology.source}, so no DLQ"
            return QueueNotFoundError(exc.queue, exc.vhost, hint)
        if route is not None:
            hint = "it is in the topology file: declare it with `rabbitflow topology declare`"
            return QueueNotFoundError(exc.queue, exc.vhost, hint)
        return exc


async def _connected(
    url: list[str], name: str, operation: Callable[[AbstractConnection], Awaitable[T]]
) -> T:
    connection = await connect(url, name=name)
    try:
        return await operation(connection)
    finally:
        await connection.close()


def held_json(held: Held, queues: list[str]) -> dict[str, Any]:
    """``{"counts": {queue: n}, "problem": null}`` (counts null when not counted)."""
    counts = None if held.problem else {queue: held.of(queue) for queue in queues}
    return {"counts": counts, "problem": held.problem}


def render_peek(seen: ops.Peek, now: datetime) -> Iterator[str]:
    """The text ``rabbitflow dlq list`` prints."""
    shown = len(seen.messages)
    if seen.count == 0:
        yield f"{seen.dlq}: empty"
    elif 0 < shown < seen.count:
        yield f"{seen.dlq}: {_messages(seen.count)}, showing the first {shown}"
    else:
        yield f"{seen.dlq}: {_messages(seen.count)}"
    for message in seen.messages:
        yield ""
        yield from render_message(message, now)


def render_message(message: ops.DeadLetter, now: datetime) -> Iterator[str]:
    """One message of ``dlq list``: identity, failure, age and a body preview."""
    yield f"#{message.position}  message_id: {message.message_id or '(none)'}"
    yield f"    error:       {_error(message)}"
    yield f"    attempt:     {message.attempt}"
    yield f"    origin:      {message.origin_queue or '(unknown)'}"
    yield f"    age:         {_age(message, now)}"
    yield f"    replays:     {message.replay_count}"
    yield f"    body:        {_body(message)}"


_AGE_SOURCES = {
    h.FIRST_FAILED_AT: f"from {h.FIRST_FAILED_AT}",
    "timestamp": f"from the AMQP timestamp; no {h.FIRST_FAILED_AT}",
    "x-death": f"from the broker's x-death time; no {h.FIRST_FAILED_AT} or timestamp",
}


def _age(message: ops.DeadLetter, now: datetime) -> str:
    seconds, source = message.age(now)
    if seconds is None or source is None:
        return f"unknown (no {h.FIRST_FAILED_AT}, timestamp or x-death)"
    return f"{format_age(seconds)} ({_AGE_SOURCES[source]})"


def _body(message: ops.DeadLetter) -> str:
    kind = f", {message.content_type}" if message.content_type else ""
    if message.content_encoding:
        kind += f" ({message.content_encoding})"
    size = f"{message.body_size} byte{'s' if message.body_size != 1 else ''}{kind}"
    return f"{size}: {message.body_preview}" if message.body_size else size
