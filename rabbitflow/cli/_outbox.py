"""``rabbitflow outbox install|relay|list|retry|purge`` (docs/outbox.md)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from rabbitflow.cli import reports_errors
from rabbitflow.cli._urls import broker_urls, url_options
from rabbitflow.errors import ConfigurationError, StoreUnavailableError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

STATES = ("pending", "parked", "sent")


@click.group()
def outbox() -> None:
    """Install, relay and inspect the transactional outbox.

    The outbox is the App's (--app MODULE:APP, its App(outbox=PostgresOutbox(...))) or given
    by --dsn and --table."""


def outbox_options(func: F) -> F:
    """``--app``, or ``--dsn``, ``--table`` and ``--schema``."""
    for option in reversed(
        (
            click.option("--app", "target", metavar="MODULE:APP", help="The App whose outbox."),
            click.option(
                "--dsn",
                metavar="URL",
                envvar="RABBITFLOW_OUTBOX_DSN",
                help="PostgreSQL (postgresql://...), without --app.",
            ),
            click.option("--table", default="rabbitflow_outbox", show_default=True),
            click.option("--schema", default=None, help="Schema (default: the search path)."),
        )
    ):
        func = option(func)
    return func


def _outbox(target: str | None, dsn: str | None, table: str, schema: str | None) -> Any:
    if target is not None:
        from rabbitflow._importer import load_app

        app = load_app(target)
        if app.outbox is None:
            raise ConfigurationError(f"{target} has no outbox: App(outbox=PostgresOutbox(...))")
        return app.outbox
    from rabbitflow.outbox import PostgresOutbox

    try:
        return PostgresOutbox(dsn or "", table=table, schema=schema)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _run(outbox: Any, operation: str, work: Awaitable[T]) -> T:
    async def guarded() -> T:
        try:
            return await work
        except outbox.db_errors as exc:
            # psycopg's messages span lines: one line for the one `error:` line.
            cause = type(exc)(" ".join(str(exc).split()))
            raise StoreUnavailableError(outbox, operation, cause) from None

    return asyncio.run(guarded())


def _needs_dsn(target: str | None, dsn: str | None) -> None:
    if target is None and not dsn:
        raise click.UsageError("give --app MODULE:APP or --dsn URL (or RABBITFLOW_OUTBOX_DSN)")


@outbox.command()
@outbox_options
@click.option("--sql", is_flag=True, help="Print the DDL instead of running it (migrations).")
@reports_errors
def install(target: str | None, dsn: str | None, table: str, schema: str | None, sql: bool) -> None:
    """Create the outbox table, its indexes and its NOTIFY trigger (idempotent)."""
    if sql:
        from rabbitflow.outbox._schema import check_identifier, ddl

        if target is None:
            try:
                check_identifier(table)
                if schema is not None:
                    check_identifier(schema, "schema")
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
            click.echo(ddl(table, schema), nl=False)
        else:
            click.echo(_outbox(target, dsn, table, schema).ddl(), nl=False)
        return
    _needs_dsn(target, dsn)
    box = _outbox(target, dsn, table, schema)
    _run(box, "install", box.install())
    click.echo(f"outbox table {box.statements.table} installed")


@outbox.command()
@click.argument("target", metavar="MODULE:APP")
@url_options
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@reports_errors
def relay(
    target: str, url: tuple[str, ...], url_order: str, log_format: str, log_level: str
) -> None:
    """Run the outbox relay of MODULE:APP alone, until SIGTERM or Ctrl-C.

    Any number may run beside each other and beside "rabbitflow run" workers."""
    from rabbitflow._importer import load_app
    from rabbitflow._logging import configure_logging
    from rabbitflow._metrics import Metrics
    from rabbitflow.topology import load_topology

    configure_logging(log_format, log_level)  # type: ignore[arg-type]
    app = load_app(target)
    if app.outbox is None:
        raise ConfigurationError(f"{target} has no outbox: App(outbox=PostgresOutbox(...))")
    file_urls: list[str] = []
    if Path(app.topology_path).exists():
        file_urls = list(load_topology(app.topology_path).broker_urls)
    app.urls = broker_urls(url or app.urls, file_urls, url_order)
    if not app.urls:
        raise ConfigurationError("no broker URL: give --url, RABBITFLOW_URL or [broker].url")

    box = app.outbox

    async def main() -> None:
        running = box.relay(app, Metrics())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, running.stop)
        try:
            await running.run()
        finally:
            await app.close()

    asyncio.run(main())


@outbox.command("list")
@outbox_options
@click.option(
    "--state",
    type=click.Choice([*STATES, "all"]),
    default="parked",
    show_default=True,
    help="Which rows.",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@reports_errors
def list_(
    target: str | None,
    dsn: str | None,
    table: str,
    schema: str | None,
    state: str,
    limit: int,
    as_json: bool,
) -> None:
    """List outbox rows (parked ones by default) with their errors, and the lag."""
    from rabbitflow.outbox import _store

    _needs_dsn(target, dsn)
    box = _outbox(target, dsn, table, schema)
    states = STATES if state == "all" else (state,)
    rows = _run(box, "list", _store.list_rows(box, states, limit))
    stats = _run(box, "stats", _store.stats(box))
    if as_json:
        for row in rows:
            record = {name: getattr(row, name) for name in row.__slots__}
            click.echo(json.dumps(record, default=str))
        return
    click.echo(
        f"{box.statements.table}: {stats.pending} pending (oldest {stats.oldest_age:.1f}s), "
        f"{stats.parked} parked"
    )
    for row in rows:
        error = f"  error: {row.error}" if row.error else ""
        click.echo(
            f"#{row.id} {row.state} {row.exchange or '(default)'} {row.routing_key} "
            f"message_id={row.message_id} key={row.key or '-'} attempts={row.attempts} "
            f"created={row.created_at:%Y-%m-%d %H:%M:%S}{error}"
        )


@outbox.command()
@outbox_options
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "every", is_flag=True, help="Every parked row.")
@reports_errors
def retry(
    target: str | None,
    dsn: str | None,
    table: str,
    schema: str | None,
    ids: tuple[int, ...],
    every: bool,
) -> None:
    """Make parked rows IDS (or --all) pending again, with their attempts reset."""
    from rabbitflow.outbox import _store

    _needs_dsn(target, dsn)
    if not ids and not every:
        raise click.UsageError("give the IDS of parked rows, or --all")
    box = _outbox(target, dsn, table, schema)
    count = _run(box, "retry", _store.retry(box, list(ids) if ids else None))
    click.echo(f"{count} parked row(s) pending again")


@outbox.command()
@outbox_options
@click.argument("ids", nargs=-1, type=int)
@click.option(
    "--state",
    type=click.Choice(["parked", "sent", "pending"]),
    default="parked",
    show_default=True,
    help="Rows in this state (pending: never published, lost for good).",
)
@click.option("--yes", is_flag=True, help="Delete without asking.")
@reports_errors
def purge(
    target: str | None,
    dsn: str | None,
    table: str,
    schema: str | None,
    ids: tuple[int, ...],
    state: str,
    yes: bool,
) -> None:
    """Delete outbox rows in --state (IDS, or all of them)."""
    from rabbitflow.outbox import _store

    _needs_dsn(target, dsn)
    if not yes:
        raise click.UsageError("purge deletes rows for good: add --yes")
    box = _outbox(target, dsn, table, schema)
    count = _run(box, "purge", _store.purge(box, (state,), list(ids) if ids else None))
    click.echo(f"{count} {state} row(s) deleted")
