"""``rabbitflow topology validate|plan|declare|export``."""

from __future__ import annotations

import asyncio
import json
import sys
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click
from aio_pika.abc import AbstractConnection

from rabbitflow.cli import quiet_client_logs, reports_errors
from rabbitflow.cli.urls import broker_urls, url_options
from rabbitflow.connection import connect
from rabbitflow.topology.declare import Declared, declare
from rabbitflow.topology.derived import Declarations, derive
from rabbitflow.topology.export import definitions, mermaid
from rabbitflow.topology.loader import load_topology
from rabbitflow.topology.plan import PlanItem, plan
from rabbitflow.urls import mask_urls

T = TypeVar("T")

DEFAULT_FILE = "topology.toml"
file_argument = click.argument("file", default=DEFAULT_FILE, type=click.Path(dir_okay=False))


@click.group()
def topology() -> None:
    """Validate, plan, declare and export a topology.toml."""


@topology.command()
@file_argument
@reports_errors
def validate(file: str) -> None:
    """Check FILE without touching a broker; exit 1 listing every error."""
    loaded = load_topology(file)
    click.echo(f"{file}: valid; {summary(derive(loaded))}")


@topology.command("plan")
@file_argument
@url_options
@reports_errors
def plan_command(file: str, url: tuple[str, ...], url_order: str) -> None:
    """Show what declare would create, and what conflicts with the broker.

    Changes nothing. Exit 1 when declare would fail on a conflict."""
    loaded = load_topology(file)
    broker = broker_urls(url, loaded.broker_urls, url_order)
    declarations = derive(loaded)
    result = _with_connection(
        broker, "rabbitflow topology plan", lambda connection: plan(connection, declarations)
    )
    click.echo(f"plan for {mask_urls(broker)} ({file}):")
    for line in plan_table(result.items):
        click.echo(f"  {line}")
    counts = result.counts()
    click.echo(", ".join(f"{counts[action]} {action}" for action in counts))
    if result.conflicts:
        click.echo(
            f"error: declare would fail: {len(result.conflicts)} conflicting object(s); "
            "see docs/topology.md on changing queue arguments",
            err=True,
        )
        sys.exit(1)


@topology.command("declare")
@file_argument
@url_options
@reports_errors
def declare_command(file: str, url: tuple[str, ...], url_order: str) -> None:
    """Declare every exchange, queue and binding of FILE (idempotent, never deletes)."""
    loaded = load_topology(file)
    broker = broker_urls(url, loaded.broker_urls, url_order)
    click.echo(f"declaring {file} on {mask_urls(broker)}")
    declarations = derive(loaded)
    done = _with_connection(
        broker,
        "rabbitflow topology declare",
        lambda connection: declare(connection, declarations, on_declared=_print_declared),
    )
    click.echo(f"declared {_count(done)}")


@topology.command()
@file_argument
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["definitions", "mermaid"]),
    required=True,
    help="definitions: JSON for rabbitmqctl import_definitions; mermaid: a flowchart.",
)
@click.option("--vhost", default="/", show_default=True, help="vhost written in definitions.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file instead of stdout.",
)
@reports_errors
def export(file: str, fmt: str, vhost: str, output: str | None) -> None:
    """Print FILE's objects as RabbitMQ definitions or a Mermaid flowchart."""
    declarations = derive(load_topology(file))
    text = _definitions_text(declarations, vhost) if fmt == "definitions" else mermaid(declarations)
    if output is None:
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {fmt} to {output}", err=True)


def summary(declarations: Declarations) -> str:
    """``4 exchanges, 4 queues, 8 retry tiers, 4 dead-letter queues, 10 bindings``."""
    roles = [spec.role for spec in declarations.queues]
    bindings = len(declarations.exchange_bindings) + len(declarations.queue_bindings)
    return (
        f"{len(declarations.exchanges)} exchanges, {roles.count('work')} queues, "
        f"{roles.count('retry')} retry tiers, {roles.count('dlq')} dead-letter queues, "
        f"{bindings} bindings"
    )


def plan_table(items: tuple[PlanItem, ...]) -> list[str]:
    """Aligned rows: action, kind, name, detail."""
    rows = [("ACTION", "KIND", "NAME", "DETAIL")]
    rows += [(item.action, item.kind, item.name, item.detail) for item in items]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True)).rstrip()
        for row in rows
    ]


def _print_declared(declared: Declared) -> None:
    # Printed as it happens, so a conflict half-way shows what was declared before it.
    click.echo(f"  {declared}")


def _count(done: list[Declared]) -> str:
    kinds = [item.kind for item in done]
    return ", ".join(f"{kinds.count(kind)} {kind}s" for kind in ("exchange", "queue", "binding"))


def _definitions_text(declarations: Declarations, vhost: str) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        document = definitions(declarations, vhost)
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    return json.dumps(document, indent=2) + "\n"


def _with_connection(
    url: list[str], name: str, action: Callable[[AbstractConnection], Awaitable[T]]
) -> T:
    quiet_client_logs()

    async def run() -> T:
        connection = await connect(url, name=name)
        try:
            return await action(connection)
        finally:
            await connection.close()

    return asyncio.run(run())
