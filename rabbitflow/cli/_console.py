"""``rabbitflow console``: serve the operator's web page (docs/console.md)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from rabbitflow._logging import configure_logging
from rabbitflow._urls import resolve_url
from rabbitflow.cli import reports_errors
from rabbitflow.errors import ConfigurationError
from rabbitflow.job import JobBook
from rabbitflow.topology import load_topology
from rabbitflow.types import LogFormat

if TYPE_CHECKING:
    from rabbitflow.outbox import PostgresOutbox

TOKEN_ENV = "RABBITFLOW_CONSOLE_TOKEN"


@click.command()
@click.argument("file", default="topology.toml", type=click.Path(dir_okay=False))
@click.option(
    "--url", metavar="URL", help="Broker URL (else RABBITFLOW_URL, the file, the default)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8025,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on.",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    metavar="TOKEN",
    help=f"Every request must carry it; required off loopback. Prefer {TOKEN_ENV}: a value "
    "given on the command line shows in ps to every user of the machine.",
)
@click.option("--read-only", is_flag=True, help="Show queues and dead letters; offer no action.")
@click.option(
    "--management-url",
    metavar="URL",
    envvar="RABBITFLOW_MANAGEMENT_URL",
    help="RabbitMQ management API (http://host:15672/), for unacked counts.",
)
@click.option(
    "--limit",
    default=500,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many messages of a DLQ the page reads and groups.",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="Of the audit lines; auto: console on a terminal, JSON otherwise.",
)
@click.option(
    "--outbox-dsn",
    metavar="URL",
    envvar="RABBITFLOW_OUTBOX_DSN",
    help="The PostgreSQL of the transactional outbox: a page of its pending and parked rows "
    "and its lag [env: RABBITFLOW_OUTBOX_DSN].",
)
@click.option(
    "--outbox-table",
    default="rabbitflow_outbox",
    show_default=True,
    help="The outbox table, with --outbox-dsn.",
)
@click.option(
    "--outbox-schema", default=None, help="The outbox table's schema, if not the default."
)
@click.option(
    "--jobs",
    "jobs_url",
    metavar="URL",
    envvar="RABBITFLOW_JOBS",
    help="The job store (redis:// or postgresql://): a page per job, and replays that queue "
    "jobs again [env: RABBITFLOW_JOBS].",
)
@click.option(
    "--jobs-prefix",
    metavar="NAME",
    help="The job store's Redis key prefix or PostgreSQL table, if not the default.",
)
@reports_errors
def console(
    file: str,
    url: str | None,
    host: str,
    port: int,
    token: str | None,
    read_only: bool,
    management_url: str | None,
    limit: int,
    log_format: LogFormat,
    outbox_dsn: str | None,
    outbox_table: str,
    outbox_schema: str | None,
    jobs_url: str | None,
    jobs_prefix: str | None,
) -> None:
    """Serve the operator console for the queues of FILE on http://HOST:PORT/.

    Queue depths, retry tiers and DLQs; dead letters grouped by error type; replay and purge
    with a confirmation step, through the same code as "rabbitflow dlq"."""
    if (
        token
        and click.get_current_context().get_parameter_source("token") is ParameterSource.COMMANDLINE
    ):
        click.echo(
            f"warning: --token is visible to every user of this machine (ps, /proc); "
            f"set {TOKEN_ENV} instead",
            err=True,
        )
    if not _loopback(host) and not token:
        raise click.UsageError(
            f"--host {host} listens beyond this machine: set --token or {TOKEN_ENV}"
        )
    try:
        import uvicorn

        from rabbitflow.console import ConsoleSettings, create_app
    except ImportError as exc:
        raise ConfigurationError(
            f"rabbitflow console needs the console extra ({exc.name} is missing): "
            "pip install 'rabbitflow[console]'"
        ) from None
    path = Path(file)
    if not path.exists():
        raise ConfigurationError(f"topology file {file} does not exist")
    topology = load_topology(path)
    settings = ConsoleSettings(
        url=resolve_url(url, topology.broker_url),
        topology=topology,
        token=token or None,
        read_only=read_only,
        host=host,
        management_url=management_url,
        limit=limit,
        outbox=None if outbox_dsn is None else _outbox(outbox_dsn, outbox_table, outbox_schema),
        jobs=None if jobs_url is None else _jobs(jobs_url, jobs_prefix),
    )
    configure_logging(log_format)
    where = f"[{host}]" if ":" in host else host
    click.echo(
        f"rabbitflow console on http://{where}:{port}/" + (" (token required)" if token else "")
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


def _outbox(dsn: str, table: str, schema: str | None) -> PostgresOutbox:
    from rabbitflow.outbox import PostgresOutbox

    try:
        return PostgresOutbox(dsn, table=table, schema=schema)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--outbox-table/--outbox-schema") from None


def _jobs(url: str, prefix: str | None) -> JobBook:
    from rabbitflow.jobs._open import open_book

    return open_book(url, prefix=prefix)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
