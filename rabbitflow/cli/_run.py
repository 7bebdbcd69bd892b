"""``rabbitflow run module:app``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from rabbitflow import _tracing as tracing
from rabbitflow._importer import UserImportError, load_app
from rabbitflow._logging import configure_logging, get_logger
from rabbitflow._progress import interval_seconds
from rabbitflow._supervisor import Supervisor
from rabbitflow._worker import DRAIN_GRACE, Worker, WorkerOptions
from rabbitflow.cli import reports_errors
from rabbitflow.cli._urls import broker_urls, reconnect_option, url_options
from rabbitflow.errors import ConfigurationError

log = get_logger("rabbitflow.run")
DUPLICATE_TERM_WINDOW = 0.5  # seconds


@click.command()
@click.argument("target", metavar="MODULE:APP")
@url_options
@reconnect_option
@click.option(
    "--topology",
    "topology_path",
    type=click.Path(path_type=Path),
    help="Topology file (default: the App's, usually ./topology.toml).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes, restarted when they crash.",
)
@click.option(
    "--no-declare",
    is_flag=True,
    help="Check the topology exists instead of declaring it (no configure permission).",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="auto: console on a terminal, JSON otherwise.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds in-flight handlers get to finish on SIGTERM.",
)
@click.option(
    "--heartbeat",
    type=click.IntRange(min=0),
    default=None,
    help="AMQP heartbeat in seconds (default: the broker's, 60).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve /metrics, /healthz and /readyz on this port.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address for --metrics-port (0.0.0.0 in a container).",
)
@click.option(
    "--management-url",
    metavar="URL",
    envvar="RABBITFLOW_MANAGEMENT_URL",
    help="RabbitMQ's management API, for the retry-tier gauges and the warning about messages "
    "held by the broker's dead-lettering (default: http://HOST:15672/ of the node in use, "
    "with its credentials).",
)
@click.option(
    "--progress-interval",
    metavar="DURATION",
    envvar="RABBITFLOW_PROGRESS_INTERVAL",
    default=None,
    help="How often each consumer with traffic logs a progress line at INFO: handled, "
    "retried, dead-lettered, rate, p50/p99 handler time (default: the App's, 60s; 0: off).",
)
@click.option(
    "--no-outbox-relay",
    is_flag=True,
    help="Do not run the relay of the App's outbox in this process (run 'rabbitflow outbox "
    "relay' instead).",
)
@click.option(
    "--worker-index",
    type=click.IntRange(min=0),
    default=None,
    hidden=True,  # set by --workers for each child: its lines carry worker and pid
)
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="Event loop; auto uses uvloop when installed.",
)
@reports_errors
def run(
    target: str,
    url: tuple[str, ...],
    url_order: str,
    reconnect_max_wait: float,
    topology_path: Path | None,
    workers: int,
    no_declare: bool,
    log_format: str,
    log_level: str,
    shutdown_timeout: float,
    heartbeat: int | None,
    metrics_port: int | None,
    metrics_host: str,
    management_url: str | None,
    progress_interval: str | None,
    no_outbox_relay: bool,
    worker_index: int | None,
    loop: str,
) -> None:
    """Consume the queues of MODULE:APP.

    MODULE:APP is the import string of your App, for example examples.orders.app:app, or
    module:factory() for a function that returns one. Prints a start-up summary, then consumes
    until SIGTERM or Ctrl-C, letting in-flight handlers finish."""
    configure_logging(log_format, log_level, worker=worker_index)  # type: ignore[arg-type]
    interval = None if progress_interval is None else _interval(progress_interval)
    if workers > 1:
        sys.exit(Supervisor(_child_args(), workers, metrics_port).run())
    try:
        app = load_app(target)
    except UserImportError as exc:
        click.echo(
            f"error: importing {exc.module!r} failed (the traceback is from your code):", err=True
        )
        click.echo(exc.trace, err=True)
        sys.exit(1)
    # Every worker carries workflows on (the step hook), whatever the app's module imports.
    import rabbitflow.workflows  # noqa: F401

    topology = app.load_topology(topology_path)
    options = WorkerOptions(
        url=broker_urls(url or app.urls, topology.broker_urls, url_order),
        max_reconnect_wait=reconnect_max_wait,
        declare=not no_declare,
        shutdown_timeout=shutdown_timeout,
        heartbeat=heartbeat,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        management_url=management_url,
        progress_interval=app.progress_interval if progress_interval is None else interval,
        outbox_relay=not no_outbox_relay,
    )
    worker = Worker(app, topology, options)
    _run_loop(worker, loop)
    # Threads of sync handlers abandoned at the shutdown timeout would keep the interpreter
    # alive; their messages are already back in the queue, so leave without joining them.
    if threading.active_count() > 1:
        sys.stderr.flush()
        os._exit(0)


TEARDOWN_GRACE = 1.0


def _interval(value: str) -> float | None:
    """``--progress-interval`` in seconds; None: off."""
    try:
        return interval_seconds(value)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--progress-interval") from None


def _exit_after(seconds: float, worker: Worker) -> None:
    """Leave the process ``seconds`` from now, whatever the event loop is doing.

    The drain bounds each broker call, but a connection the broker no longer reads (a
    memory alarm, a half-open TCP link) can leave the AMQP client's tasks unable to finish,
    and a sync handler can hold the loop. A thread, not the loop, keeps the promise that
    SIGTERM ends the process within --shutdown-timeout plus the grace; the broker requeues
    whatever is still unacked when the connection goes."""

    def leave() -> None:
        if not worker.finished:
            log.error(
                "shutdown did not finish in time; exiting now, unacked messages return to "
                "their queues",
                after_s=round(seconds, 1),
            )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(0 if worker.finished else 1)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def _child_args(
    dropped: tuple[str, ...] = ("--workers", "--metrics-port", "--worker-index"),
) -> list[str]:
    """This command line without the options the supervisor sets per child."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in dropped:
            skip = True
            continue
        if arg.split("=", 1)[0] in dropped:
            continue
        args.append(arg)
    return args


def _run_loop(worker: Worker, loop: str) -> None:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise click.UsageError("--loop uvloop: uvloop is not installed") from None
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(_main(worker))
            return
    asyncio.run(_main(worker))


async def _main(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    signals = 0

    first_term = 0.0

    def on_signal(signum: int) -> None:
        nonlocal signals, first_term
        now = time.monotonic()
        if signum == signal.SIGTERM and signals and now - first_term < DUPLICATE_TERM_WINDOW:
            # A service manager that signals the whole process group, plus the supervisor
            # forwarding the same SIGTERM: one stop request, delivered twice.
            return
        signals += 1
        first_term = first_term or now
        if signals > 1:
            log.warning("second signal: exiting now; unacked messages return to their queues")
            sys.stderr.flush()
            os._exit(1)
        worker.stop()
        _exit_after(worker.options.shutdown_timeout + DRAIN_GRACE, worker)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await worker.run()
    tracing.flush()
    # What the AMQP client leaves behind on a connection the broker stopped reading may never
    # finish cancelling; the work is done, so the loop's teardown gets a second at most.
    _exit_after(TEARDOWN_GRACE, worker)
