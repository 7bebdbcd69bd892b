"""The ``rabbitflow`` command line.

Subcommands are imported when they run, not before: ``rabbitflow --help`` and ``topology
validate`` never load aio-pika or OpenTelemetry (docs/performance.md, "CLI start-up")."""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from rabbitflow.errors import OutputError, RabbitflowError

P = ParamSpec("P")
T = TypeVar("T")

# name: (module, attribute, one-line help shown by `rabbitflow --help`). The one-line help is
# the first sentence of the command's own help (tests/test_cli_help.py keeps them equal).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "console": (
        "rabbitflow.cli._console",
        "console",
        "Serve the operator console for the queues of FILE on http://HOST:PORT/.",
    ),
    "dlq": ("rabbitflow.cli._dlq", "dlq", "Inspect, replay and purge dead-letter queues."),
    "docs": (
        "rabbitflow.cli._docs",
        "docs",
        "Generate documentation from an app and its topology.",
    ),
    "outbox": (
        "rabbitflow.cli._outbox",
        "outbox",
        "Install, relay and inspect the transactional outbox.",
    ),
    "publish": ("rabbitflow.cli._publish", "publish", "Publish BODY with publisher confirms."),
    "retries": (
        "rabbitflow.cli._retries",
        "retries",
        "Inspect the retry tiers of a queue (QUEUE.retry.<delay>).",
    ),
    "run": ("rabbitflow.cli._run", "run", "Consume the queues of MODULE:APP."),
    "topology": (
        "rabbitflow.cli._topology",
        "topology",
        "Validate, plan, declare and export a topology.toml.",
    ),
}
CLIENT_LOGGERS = ("aio_pika", "aiormq")
# aiormq's exception reprs: <ChannelNotFoundEntity: The client attempted ...: "NOT_FOUND - ...">
_CLIENT_REPR = re.compile(r"<[A-Za-z]+: [^<>]*?: (['\"])(.*?)\1>")


class LazyGroup(click.Group):
    """A group whose subcommands in :data:`COMMANDS` are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attr, _ = COMMANDS[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(formatter.width)))
            else:
                rows.append((name, COMMANDS[name][2]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def plain(text: str) -> str:
    """``text`` with aiormq exception reprs replaced by the broker's own reply."""
    return _CLIENT_REPR.sub(r"\2", text)


def reports_errors(func: Callable[P, T]) -> Callable[P, T]:
    """Print an expected error as one ``error:`` line and exit 1.

    Expected errors are rabbitflow's own and a broker's refusal reaching us raw from the AMQP
    client. ``rabbitflow --debug`` shows the traceback instead."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, RabbitflowError) and not _from_client(exc):
                raise
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().params.get("debug"):
                raise
            message = plain(str(exc)) if isinstance(exc, RabbitflowError) else _refusal(exc)
            click.echo(f"error: {message}", err=True)
            sys.exit(1)

    return wrapper


def _from_client(exc: BaseException) -> bool:
    # Checked by module name so that commands which never connect do not import aiormq.
    return type(exc).__module__.startswith(("aiormq", "pamqp"))


def _refusal(exc: BaseException) -> str:
    reason = plain(str(exc)) or type(exc).__name__
    return f"the broker refused the operation: {reason}"


def amqp_name(kind: str) -> Callable[[click.Context, click.Parameter, str], str]:
    """A click callback refusing a queue or exchange name the AMQP client would refuse."""

    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        from rabbitflow.topology._wire import ALLOWED_FORM, name_problems

        for message, _ in name_problems(value, kind):
            raise click.BadParameter(f"{value!r}: {message} (use {ALLOWED_FORM})")
        return value

    return check


def write_output(path: str | Path, text: str) -> None:
    """Write an ``--output`` file; a path that cannot be written is one ``error:`` line."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(str(path), str(exc.strerror or exc)) from None


def quiet_client_logs() -> None:
    """Leave connection-failure reporting to our one-line error, not aiormq's own log.

    ``rabbitflow run --log-level debug`` shows them again (rabbitflow.logging)."""
    # aio-pika and aiormq log connection failures themselves; without a handler Python would
    # print them to stderr next to our one-line error.
    for name in CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        logger.propagate = False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for expected errors.")
@click.version_option(
    None, "-V", "--version", package_name="rabbitflow", message="%(prog)s %(version)s"
)
def cli(debug: bool) -> None:
    """rabbitflow: declarative RabbitMQ consumers.

    Topology as code, typed handlers, delayed retries and dead-letter queues built in.

    Check a topology with "rabbitflow topology validate", declare it with "rabbitflow topology
    declare", then consume with "rabbitflow run MODULE:APP". Every command has --help."""


def _register() -> None:
    """Import every subcommand now (the docs generator and tests walk them all)."""
    for name in COMMANDS:
        cli.get_command(click.Context(cli), name)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point."""
    quiet_client_logs()
    return cli.main(args=argv, prog_name="rabbitflow")
