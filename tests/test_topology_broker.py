"""declare, plan and verify against a real RabbitMQ, each test in its own vhost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from click.testing import CliRunner, Result

import rabbitflow.cli
from rabbitflow.errors import AccessRefusedError, TopologyConflictError, TopologyMismatchError
from rabbitflow.topology import Declarations, derive, load_topology
from rabbitflow.topology._declare import declare, verify
from rabbitflow.topology._plan import plan
from tests.support.broker import Rabbit

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "topology.toml"
RABBITFLOW = Path(sys.executable).parent / "rabbitflow"


def run_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    rabbitflow.cli._register()
    return CliRunner().invoke(rabbitflow.cli.cli, list(args), env=env)


def example() -> Declarations:
    return derive(load_topology(EXAMPLE))


# --- what the broker holds, as rabbitmqctl reports it ---------------------------------------


def _json(rabbit: Rabbit, vhost: str, what: str, *columns: str) -> list[dict[str, Any]]:
    out = rabbit.ctl(f"list_{what}", "-p", vhost, *columns, "--formatter", "json")
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def _table(arguments: list[list[Any]]) -> dict[str, Any]:
    # rabbitmqctl's JSON gives each argument as [name, AMQP type, value].
    return {name: value for name, _type, value in arguments}


def broker_queues(rabbit: Rabbit, vhost: str) -> dict[str, dict[str, Any]]:
    rows = _json(rabbit, vhost, "queues", "name", "durable", "auto_delete", "arguments")
    return {
        row["name"]: {
            "durable": row["durable"],
            "auto_delete": row["auto_delete"],
            "arguments": _table(row["arguments"]),
        }
        for row in rows
    }


def broker_exchanges(rabbit: Rabbit, vhost: str) -> dict[str, dict[str, Any]]:
    rows = _json(
        rabbit,
        vhost,
        "exchanges",
        "name",
        "type",
        "durable",
        "auto_delete",
        "internal",
        "arguments",
    )
    return {
        row["name"]: {key: row[key] for key in ("type", "durable", "auto_delete", "internal")}
        | {"arguments": _table(row["arguments"])}
        for row in rows
        if row["name"] and not row["name"].startswith("amq.")  # the vhost's own exchanges
    }


def broker_bindings(rabbit: Rabbit, vhost: str) -> set[tuple[Any, ...]]:
    columns = ("source_name", "destination_name", "destination_kind", "routing_key", "arguments")
    rows = _json(rabbit, vhost, "bindings", *columns)
    return {
        (*(row[c] for c in columns[:4]), tuple(sorted(_table(row["arguments"]).items())))
        for row in rows
        if row["source_name"]  # every queue's implicit binding to the default exchange
    }


def broker_state(rabbit: Rabbit, vhost: str) -> dict[str, Any]:
    """Everything a vhost holds, comparable across vhosts."""
    return {
        "queues": broker_queues(rabbit, vhost),
        "exchanges": broker_exchanges(rabbit, vhost),
        "bindings": broker_bindings(rabbit, vhost),
    }


def expected_bindings(declarations: Declarations) -> set[tuple[Any, ...]]:
    return {
        (
            b.source,
            b.destination,
            b.destination_type,
            b.routing_key,
            tuple(sorted(b.arguments.items())),
        )
        for b in (*declarations.exchange_bindings, *declarations.queue_bindings)
    }


def object_names(declarations: Declarations) -> list[tuple[str, str]]:
    """(kind, name) of every exchange and queue."""
    exchanges = [("exchange", spec.name) for spec in declarations.exchanges]
    return exchanges + [("queue", spec.name) for spec in declarations.queues]


# --- declare --------------------------------------------------------------------------------


def test_declare_twice_creates_exactly_what_derive_computes(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    first = run_cli("topology", "declare", str(EXAMPLE), "--url", vhost_url)
    second = run_cli("topology", "declare", str(EXAMPLE), "--url", vhost_url)

    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    assert "queue billing.order-created.retry.30s" in second.output
    declarations = example()
    queues = broker_queues(rabbit, vhost)
    assert sorted(queues) == sorted(spec.name for spec in declarations.queues)
    for spec in declarations.queues:
        assert queues[spec.name]["durable"] is spec.durable
        assert queues[spec.name]["auto_delete"] is spec.auto_delete
        for argument, value in spec.arguments.items():
            assert queues[spec.name]["arguments"].get(argument) == value, (spec.name, argument)
        assert set(queues[spec.name]["arguments"]) == set(spec.arguments), spec.name
    exchanges = broker_exchanges(rabbit, vhost)
    assert exchanges == {
        spec.name: {
            "type": spec.type,
            "durable": spec.durable,
            "auto_delete": spec.auto_delete,
            "internal": spec.internal,
            "arguments": spec.arguments,
        }
        for spec in declarations.exchanges
    }
    assert broker_bindings(rabbit, vhost) == expected_bindings(declarations)


def test_retry_tiers_dead_letter_back_to_their_queue(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    run_cli("topology", "declare", str(EXAMPLE), "--url", vhost_url)

    tier = broker_queues(rabbit, vhost)["billing.order-created.retry.30s"]["arguments"]

    assert tier["x-message-ttl"] == 30_000
    assert tier["x-dead-letter-exchange"] == ""
    assert tier["x-dead-letter-routing-key"] == "billing.order-created"
    assert tier["x-dead-letter-strategy"] == "at-least-once"


def predeclare(url: str, name: str, arguments: dict[str, Any]) -> None:
    """Create a queue the way someone else might have, before rabbitflow runs."""

    async def run() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments=arguments)

    asyncio.run(run())


def _work_queue_arguments(name: str) -> dict[str, Any]:
    return dict(next(q for q in example().queues if q.name == name).arguments)


def test_conflicting_delivery_limit_names_both_values(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    arguments = _work_queue_arguments("billing.order-created") | {"x-delivery-limit": 3}
    predeclare(vhost_url, "billing.order-created", arguments)

    result = run_cli("topology", "declare", str(EXAMPLE), "--url", vhost_url)

    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "error: queue 'billing.order-created': x-delivery-limit: broker 3, file 10; "
        "RabbitMQ cannot change it in place; nothing was declared: run "
        f"`rabbitflow topology migrate {EXAMPLE} billing.order-created`"
    )
    assert "Traceback" not in result.output
    limit = broker_queues(rabbit, vhost)["billing.order-created"]["arguments"]["x-delivery-limit"]
    assert limit == 3  # never changed, never deleted


def test_conflicting_message_ttl_names_both_values(tmp_path: Path, vhost_url: str) -> None:
    path = tmp_path / "topology.toml"
    path.write_text('[queues.jobs]\narguments = { "x-message-ttl" = 2000 }\n', encoding="utf-8")
    arguments = derive(load_topology(path)).queues[0].arguments | {"x-message-ttl": 1000}
    predeclare(vhost_url, "jobs", arguments)

    result = run_cli("topology", "declare", str(path), "--url", vhost_url)

    assert result.exit_code == 1
    assert "x-message-ttl: broker 1000, file 2000" in result.stderr
    assert "Traceback" not in result.output


async def test_argument_missing_on_one_side_is_a_conflict(tmp_path: Path, vhost_url: str) -> None:
    path = tmp_path / "topology.toml"
    path.write_text('[queues.jobs]\nqueue_type = "classic"\n', encoding="utf-8")
    declarations = derive(load_topology(path))
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        arguments = declarations.queues[0].arguments | {"x-max-length": 10}
        await channel.declare_queue("jobs", durable=True, arguments=arguments)

        with pytest.raises(TopologyConflictError) as raised:
            await declare(connection, declarations)

    assert (raised.value.argument, raised.value.broker_value, raised.value.file_value) == (
        "x-max-length",
        10,
        None,
    )
    assert "x-max-length: broker 10, file not set" in str(raised.value)


async def test_conflict_on_an_exchange_type(tmp_path: Path, vhost_url: str) -> None:
    path = tmp_path / "topology.toml"
    path.write_text('[exchanges.orders]\ntype = "topic"\n', encoding="utf-8")
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange("orders", "fanout", durable=True)

        with pytest.raises(TopologyConflictError) as raised:
            await declare(channel, derive(load_topology(path)))

    assert str(raised.value) == (
        "exchange 'orders': type: broker 'fanout', file 'topic'; an exchange cannot change "
        "in place: delete it and declare it again; nothing was declared"
    )


async def test_declare_without_configure_permission(rabbit: Rabbit, vhost: str) -> None:
    user, password = f"rf-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbit.admin.add_user(user, password)
    try:
        rabbit.admin.set_permissions(vhost, user, "^$", ".*", ".*")
        url = rabbit.vhost_url(vhost).replace("guest:guest@", f"{user}:{password}@")
        connection = await aio_pika.connect(url)
        async with connection:
            with pytest.raises(AccessRefusedError) as raised:
                await declare(connection, example())
    finally:
        rabbit.forget_user(user)
    assert str(raised.value).startswith(
        "cannot declare exchange 'orders': the user lacks configure permission on 'orders'"
    )


# --- plan -----------------------------------------------------------------------------------


def test_plan_on_an_empty_vhost_creates_everything_and_changes_nothing(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    result = run_cli("topology", "plan", str(EXAMPLE), "--url", vhost_url, "--no-management")

    assert result.exit_code == 0, result.output
    rows = [line.split()[:3] for line in result.stdout.splitlines()]
    for kind, name in object_names(example()):
        assert ["create", kind, name] in rows
    assert "20 create, 0 ok, 0 conflict, 10 bind" in result.stdout
    assert broker_queues(rabbit, vhost) == {}
    assert broker_exchanges(rabbit, vhost) == {}


async def test_plan_after_declare_is_all_ok(vhost_url: str) -> None:
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        await declare(connection, example())

        result = await plan(connection, example())

    assert {item.action for item in result.items if item.kind != "binding"} == {"ok"}
    assert {item.action for item in result.items if item.kind == "binding"} == {"bind"}
    assert result.conflicts == []


def test_plan_reports_a_conflict_and_exits_1(rabbit: Rabbit, vhost: str, vhost_url: str) -> None:
    arguments = _work_queue_arguments("shipping.order-paid") | {"x-delivery-limit": 3}
    predeclare(vhost_url, "shipping.order-paid", arguments)

    result = run_cli("topology", "plan", str(EXAMPLE), "--url", vhost_url, "--no-management")

    assert result.exit_code == 1
    migrate_rows = [line.split() for line in result.stdout.splitlines() if "migrate  " in line]
    assert migrate_rows == [
        [
            "migrate",
            "queue",
            "shipping.order-paid",
            "x-delivery-limit:",
            "broker",
            "3,",
            "file",
            "10",
            "(needs",
            "`rabbitflow",
            "topology",
            "migrate`)",
        ]
    ]
    assert "19 create, 0 ok, 0 conflict, 1 migrate, 10 bind" in result.stdout
    assert result.stderr.startswith(
        "error: declare would fail: 1 queue to migrate first: "
        f"rabbitflow topology migrate {EXAMPLE} shipping.order-paid"
    )
    assert sorted(broker_queues(rabbit, vhost)) == ["shipping.order-paid"]  # nothing created


async def test_plan_api_tells_create_from_ok(vhost_url: str) -> None:
    declarations = example()
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange("orders", "topic", durable=True)

        result = await plan(connection, declarations)

    assert result.action_of("exchange", "orders") == "ok"
    assert result.action_of("exchange", "dlx") == "create"
    assert result.action_of("queue", "audit.all.dlq") == "create"
    assert result.counts() == {"create": 19, "ok": 1, "conflict": 0, "bind": 10}


# --- unreachable broker, verify -------------------------------------------------------------


def test_unreachable_broker_is_one_line_without_the_password() -> None:
    url = "amqp://guest:secretpw@127.0.0.1:1/"

    result = run_cli("topology", "declare", str(EXAMPLE), "--url", url)

    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot connect to amqp://guest:***@127.0.0.1:1/")
    assert result.stderr.count("\n") == 1
    assert "secretpw" not in result.output


def test_unreachable_broker_in_a_real_process(tmp_path: Path) -> None:
    env = {"RABBITFLOW_URL": "amqp://guest:secretpw@127.0.0.1:1/", "PATH": "/usr/bin:/bin"}

    done = subprocess.run(
        [str(RABBITFLOW), "topology", "plan", str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        done.stderr.strip()
    ]  # one line: no traceback, no client-library log lines
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in done.stderr
    assert "secretpw" not in done.stdout + done.stderr


async def test_verify_names_a_missing_queue(rabbit: Rabbit, vhost: str, vhost_url: str) -> None:
    declarations = example()
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        await declare(connection, declarations)
        await verify(connection, declarations)  # everything there: no error
        rabbit.admin.delete_queue(vhost, "support.vip-orders.retry.5s")

        with pytest.raises(TopologyMismatchError) as raised:
            await declare(connection, declarations, passive=True)

    assert str(raised.value).startswith(
        "missing on the broker: queue 'support.vip-orders.retry.5s';"
    )
    assert "support.vip-orders.retry.5s" not in broker_queues(rabbit, vhost)  # not re-created


async def test_verify_lists_every_missing_object(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        with pytest.raises(TopologyMismatchError) as raised:
            await verify(connection, example())

    message = str(raised.value)
    for kind, name in object_names(example()):
        assert f"{kind} {name!r}" in message
    assert broker_queues(rabbit, vhost) == {}
