"""``rabbitflow topology validate|plan|declare|export``."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import click

from rabbitflow._broker_version import BrokerVersion
from rabbitflow._urls import mask_url, mask_urls
from rabbitflow.cli import quiet_client_logs, reports_errors, write_output
from rabbitflow.cli._urls import broker_urls, url_options
from rabbitflow.errors import TopologyError
from rabbitflow.topology._checks import check_for_broker
from rabbitflow.topology._derived import Declarations, QueueSpec, derive, for_broker
from rabbitflow.topology._loader import load_topology
from rabbitflow.topology._model import Topology

if TYPE_CHECKING:
    # The commands that talk to a broker import the client when they run, so that validate
    # and export start fast.
    from aio_pika.abc import AbstractConnection

    from rabbitflow.topology._declare import Declared, Management
    from rabbitflow.topology._plan import Plan, PlanItem

T = TypeVar("T")

DEFAULT_FILE = "topology.toml"
file_argument = click.argument("file", default=DEFAULT_FILE, type=click.Path(dir_okay=False))


@click.group()
def topology() -> None:
    """Validate, plan, declare and export a topology.toml."""


def _broker_version(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> BrokerVersion | None:
    if value is None:
        return None
    version = BrokerVersion.parse(value)
    if version is None:
        raise click.BadParameter(f"{value!r} is not a RabbitMQ version such as 4.3 or 3.13.7")
    return version


@topology.command()
@file_argument
@click.option(
    "--broker-version",
    metavar="VERSION",
    callback=_broker_version,
    help="Also check FILE against this RabbitMQ release (e.g. 4.3): what it refuses, and how "
    "settings that differ per version (consumer_timeout) take effect there.",
)
@reports_errors
def validate(file: str, broker_version: BrokerVersion | None) -> None:
    """Check FILE without touching a broker; exit 1 listing every error."""
    loaded = load(file)
    if broker_version is None:
        click.echo(f"{file}: valid; {summary(derive(loaded))}")
        return
    problems, notes = check_for_broker(loaded, broker_version)
    target = f"RabbitMQ {broker_version.major}.{broker_version.minor}"
    if problems:
        raise TopologyError(f"{file} on {target}", problems)
    click.echo(f"{file}: valid for {target}; {summary(derive(loaded))}")
    for note in notes:
        click.echo(f"note: {note}")


@topology.command("plan")
@file_argument
@url_options
@click.option(
    "--management-url",
    metavar="URL",
    envvar="RABBITFLOW_MANAGEMENT_URL",
    help="RabbitMQ's management HTTP API (default: http://HOST:15672/ of the broker URL, "
    "with its credentials).",
)
@click.option(
    "--no-management",
    is_flag=True,
    help="Compare over AMQP only: bindings, policies and objects not in the file are not seen.",
)
@click.option(
    "--exit-code",
    is_flag=True,
    help="Exit 2 when the broker differs from the file in any way (for CI drift checks).",
)
@reports_errors
def plan_command(
    file: str,
    url: tuple[str, ...],
    url_order: str,
    management_url: str | None,
    no_management: bool,
    exit_code: bool,
) -> None:
    """Show what declare would create, and how the broker differs from FILE.

    Changes nothing, deletes nothing. Exit 1 when declare would fail on a conflict; with
    --exit-code, exit 2 when anything differs."""
    from rabbitflow.topology._management import vhost_of, with_credentials

    loaded = load(file)
    broker = broker_urls(url, loaded.broker_urls, url_order)
    declarations = derive(loaded)
    # The management API of the first node: every node of a cluster answers for all.
    api = None if no_management else with_credentials(management_url, broker[0])
    result, reason = _with_connection(
        broker,
        "rabbitflow topology plan",
        lambda connection: _plan(connection, declarations, api, vhost_of(broker[0])),
    )
    through = f", through the management API at {mask_url(api)}" if reason is None and api else ""
    click.echo(f"plan for {mask_urls(broker)} ({file}){through}:")
    for line in plan_table(result.items):
        click.echo(f"  {line}")
    counts = result.counts()
    click.echo(", ".join(f"{counts[action]} {action}" for action in counts))
    for use in result.uses:
        click.echo(f"note: {use}")
    if result.unseen is not None:
        why = (
            "--no-management" if api is None else f"the management API at {mask_url(api)} {reason}"
        )
        click.echo(f"note: {why}: {result.unseen}")
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.conflicts or result.migrations:
        reasons = []
        if result.conflicts:
            reasons.append(plural(len(result.conflicts), "conflicting object"))
        if result.migrations:
            queues = " ".join(
                sorted({_owner(item.name, declarations) for item in result.migrations})
            )
            reasons.append(
                f"{plural(len(result.migrations), 'queue')} to migrate first: "
                f"rabbitflow topology migrate {file} {queues}"
            )
        click.echo(
            f"error: declare would fail: {'; '.join(reasons)}; see docs/operations.md "
            '"Changing a queue"',
            err=True,
        )
        sys.exit(1)
    if exit_code and result.differences:
        click.echo(f"the broker differs from {file}: {len(result.differences)} row(s)", err=True)
        sys.exit(2)


async def _plan(
    connection: AbstractConnection, declarations: Declarations, api: str | None, vhost: str
) -> tuple[Plan, str | None]:
    from rabbitflow.errors import ManagementUnavailable
    from rabbitflow.topology._management import read_state
    from rabbitflow.topology._plan import plan

    state = None
    reason = None
    if api is not None:
        try:
            state = await read_state(api, vhost)
        except ManagementUnavailable as exc:
            reason = exc.reason
    return await plan(connection, declarations, state), reason


def _owner(name: str, declarations: Declarations) -> str:
    spec = next((q for q in declarations.queues if q.name == name), None)
    return spec.owner if spec is not None else name


management_options = [
    click.option(
        "--management-url",
        metavar="URL",
        envvar="RABBITFLOW_MANAGEMENT_URL",
        help="RabbitMQ's management HTTP API (default: http://HOST:15672/ of the broker URL, "
        "with its credentials).",
    ),
    click.option(
        "--no-management",
        is_flag=True,
        help="Do not use the management API (policies are then neither read nor applied).",
    ),
]


def with_management(func: Callable[..., T]) -> Callable[..., T]:
    """``--management-url`` and ``--no-management``."""
    for option in reversed(management_options):
        func = option(func)
    return func


@topology.command("declare")
@file_argument
@url_options
@with_management
@reports_errors
def declare_command(
    file: str,
    url: tuple[str, ...],
    url_order: str,
    management_url: str | None,
    no_management: bool,
) -> None:
    """Declare every exchange, queue and binding of FILE (idempotent, never deletes).

    Every object is checked against the broker first: when one cannot be declared as FILE
    says, nothing is declared. What a policy can carry is applied as rabbitflow's policy of
    the queue (docs/operations.md "Changing a queue")."""
    from rabbitflow.topology._declare import Management, declare
    from rabbitflow.topology._management import vhost_of, with_credentials

    loaded = load(file)
    broker = broker_urls(url, loaded.broker_urls, url_order)
    click.echo(f"declaring {file} on {mask_urls(broker)}")
    declarations = derive(loaded)
    management = None
    if not no_management:
        management = Management(with_credentials(management_url, broker[0]), vhost_of(broker[0]))
    done = _with_connection(
        broker,
        "rabbitflow topology declare",
        lambda connection: declare(
            connection,
            declarations,
            on_declared=_print_declared,
            management=management,
            file=file,
        ),
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
@click.option(
    "--broker-version",
    metavar="VERSION",
    callback=_broker_version,
    help="Write what this RabbitMQ release accepts (e.g. 4.3: no x-consumer-timeout on "
    "classic queues and streams).",
)
@reports_errors
def export(
    file: str, fmt: str, vhost: str, output: str | None, broker_version: BrokerVersion | None
) -> None:
    """Print FILE's objects as RabbitMQ definitions or a Mermaid flowchart."""
    from rabbitflow.topology._export import mermaid

    declarations = for_broker(derive(load(file)), broker_version)
    if broker_version is None and fmt == "definitions":
        _warn_refused_on_newest(declarations)
    text = _definitions_text(declarations, vhost) if fmt == "definitions" else mermaid(declarations)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_output(output, text)
        click.echo(f"wrote {fmt} to {output}", err=True)


def _warn_refused_on_newest(declarations: Declarations) -> None:
    newest = BrokerVersion(4, 3)
    refused = [q.name for q in declarations.queues if for_broker_changes(q, newest)]
    if refused:
        click.echo(
            "warning: RabbitMQ 4.3 and later refuse x-consumer-timeout on classic queues and "
            f"streams: {', '.join(refused)}: pass --broker-version to write definitions for "
            "your broker",
            err=True,
        )


def for_broker_changes(spec: QueueSpec, version: BrokerVersion) -> bool:
    """Whether ``version`` would not take ``spec`` as it is."""
    adapted = for_broker(Declarations((), (), (spec,), (), {}), version)
    return adapted.queues[0] != spec


def load(file: str) -> Topology:
    """Load FILE, printing its warnings (likely mistakes that are not errors) to stderr."""
    loaded = load_topology(file)
    for warning in loaded.warnings:
        click.echo(f"warning: {loaded.source}: {warning}", err=True)
    return loaded


def plural(count: int, noun: str, nouns: str = "") -> str:
    """``1 queue``, ``2 queues``, ``0 queues``."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def summary(declarations: Declarations) -> str:
    """``4 exchanges, 4 queues, 8 retry tiers, 4 dead-letter queues, 10 bindings``."""
    roles = [spec.role for spec in declarations.queues]
    bindings = len(declarations.exchange_bindings) + len(declarations.queue_bindings)
    return ", ".join(
        [
            plural(len(declarations.exchanges), "exchange"),
            plural(roles.count("work"), "queue"),
            plural(roles.count("retry"), "retry tier"),
            plural(roles.count("dlq"), "dead-letter queue"),
            plural(bindings, "binding"),
        ]
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
    return ", ".join(plural(kinds.count(kind), kind) for kind in ("exchange", "queue", "binding"))


def _definitions_text(declarations: Declarations, vhost: str) -> str:
    from rabbitflow.topology._export import definitions

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        document = definitions(declarations, vhost)
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    return json.dumps(document, indent=2) + "\n"


def _with_connection(
    url: list[str], name: str, action: Callable[[AbstractConnection], Awaitable[T]]
) -> T:
    import asyncio

    from rabbitflow.connection import connect

    quiet_client_logs()

    async def run() -> T:
        connection = await connect(url, name=name)
        try:
            return await action(connection)
        finally:
            await connection.close()

    return asyncio.run(run())


@topology.command("migrate")
@file_argument
@click.argument("queues", nargs=-1)
@url_options
@with_management
@click.option("--dry-run", is_flag=True, help="Print each step; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@reports_errors
def migrate_command(
    file: str,
    queues: tuple[str, ...],
    url: tuple[str, ...],
    url_order: str,
    management_url: str | None,
    no_management: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Re-create queues whose arguments changed, without losing a message.

    QUEUES default to every queue of FILE. A queue whose change a policy can carry gets
    rabbitflow's policy (no message moves). Otherwise a temporary queue QUEUE.migrating,
    bound like QUEUE, takes new messages; the messages move to it (confirm, then ack); QUEUE
    is deleted, declared as FILE says and bound again; the messages move back and the
    temporary queue is deleted. The queue's retry tiers and DLQ follow. Run it again after
    an interruption: it resumes where it stopped (docs/operations.md "Changing a queue")."""
    from rabbitflow.topology._declare import Management
    from rabbitflow.topology._management import vhost_of, with_credentials

    loaded = load(file)
    broker = broker_urls(url, loaded.broker_urls, url_order)
    declarations = derive(loaded)
    management = None
    if not no_management:
        management = Management(with_credentials(management_url, broker[0]), vhost_of(broker[0]))
    verb = "plan of the migration" if dry_run else "migrating"
    click.echo(f"{verb} {file} on {mask_urls(broker)}")
    _with_connection(
        broker,
        "rabbitflow topology migrate",
        lambda connection: _migrate(
            connection, declarations, list(queues), management, dry_run=dry_run, yes=yes
        ),
    )


async def _migrate(
    connection: AbstractConnection,
    declarations: Declarations,
    owners: list[str],
    management: Management | None,
    *,
    dry_run: bool,
    yes: bool,
) -> None:
    import time

    from rabbitflow.errors import TopologyConflictError
    from rabbitflow.topology._migrate import Migration

    if management is not None:
        from rabbitflow.errors import ManagementUnavailable
        from rabbitflow.topology._management import read_state

        try:
            await read_state(management.api, management.vhost)
        except ManagementUnavailable as exc:
            click.echo(
                f"note: the management API {exc.reason}: only the file's bindings are carried "
                "over, and policies are not applied"
            )
            management = None
    migration = Migration(connection, declarations, management=management, say=click.echo)
    started = time.monotonic()
    try:
        specs = await migration.queues(owners)
        plans = [(spec, *await migration.state(spec)) for spec in specs]
        todo = [(spec, state, checked) for spec, state, checked in plans if state != "done"]
        for spec, state, checked in plans:
            if state == "done":
                click.echo(f"  {spec.name}: as the file says, nothing to do")
            elif state == "missing":
                click.echo(f"  {spec.name}: missing; `rabbitflow topology declare` creates it")
            elif state == "policy" and checked is not None:
                definition = ", ".join(f"{k} = {v!r}" for k, v in checked.policy_definition.items())
                click.echo(
                    f"  {spec.name}: policy rabbitflow.{spec.name}: {definition} (no message moves)"
                )
            else:
                why = checked.detail() if checked is not None else "migration under way"
                click.echo(f"  {spec.name}: {why}")
                for step in migration.steps(spec, state, checked):
                    click.echo(f"    step {step.number}/10: {step.text}")
        work = [item for item in todo if item[1] not in ("missing",)]
        if dry_run or not work:
            return
        if not yes:
            click.confirm(f"migrate {plural(len(work), 'queue')}?", abort=True)
        await migration.prepare_exchanges()
        for spec, state, checked in work:
            if state == "policy" and checked is not None:
                await migration.apply_policy(checked)
                click.echo(f"  {spec.name}: applied policy rabbitflow.{spec.name}")
                continue
            for attempt in range(3):
                try:
                    for step in migration.steps(spec, state, checked):
                        click.echo(f"  {spec.name}: step {step.number}/10: {step.text}")
                        await step.run()
                    break
                except TopologyConflictError as exc:
                    # Declared back with its old arguments meanwhile (a worker running the old
                    # file): the broker's state says where to go on.
                    if attempt == 2:
                        raise
                    click.echo(f"  {spec.name}: {exc}; going on from the broker's state")
                    state, checked = await migration.state(spec)
        moved = sum(m.messages for _, _, m in migration.moved)
        click.echo(
            f"migrated {plural(len(work), 'queue')} in {time.monotonic() - started:.1f} s; "
            f"{moved} messages moved"
        )
    finally:
        await migration.close()
