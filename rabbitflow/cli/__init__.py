"""The ``rabbitflow`` command line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click

from rabbitflow.errors import RabbitflowError

P = ParamSpec("P")
T = TypeVar("T")


def reports_errors(func: Callable[P, T]) -> Callable[P, T]:
    """Print an expected rabbitflow error as one line and exit 1.

    ``rabbitflow --debug`` shows the traceback instead."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except RabbitflowError as exc:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


def quiet_client_logs() -> None:
    """Leave connection-failure reporting to our one-line error, not aiormq's own log."""
    # aio-pika and aiormq log connection failures themselves; without a handler Python would
    # print them to stderr next to our one-line error.
    for name in ("aio_pika", "aiormq"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for expected errors.")
@click.version_option(package_name="rabbitflow")
def cli(debug: bool) -> None:
    """rabbitflow: declarative RabbitMQ consumers."""


def _register() -> None:
    from rabbitflow.cli import publish, run, topology

    cli.add_command(topology.topology)
    cli.add_command(run.run)
    cli.add_command(publish.publish)
    from rabbitflow.cli import dlq

    cli.add_command(dlq.dlq)
    from rabbitflow.cli import retries

    cli.add_command(retries.retries)
    from rabbitflow.cli import docs

    cli.add_command(docs.docs)
    from rabbitflow.cli import console

    cli.add_command(console.console)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point."""
    _register()
    return cli.main(args=argv, prog_name="rabbitflow")
