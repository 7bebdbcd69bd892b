"""``topology plan`` on a drifted vhost: bindings, objects not in the file, policies, every
differing argument, ``--exit-code``; and what it says when the management API is not there."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiormq
import pytest
from click.testing import CliRunner, Result

import rabbitflow.cli
from rabbitflow._broker_version import BrokerVersion
from rabbitflow._urls import mask_url
from rabbitflow.topology import derive, parse_topology
from rabbitflow.topology._derived import QueueSpec
from rabbitflow.topology._drift import applied_policy, differences
from rabbitflow.topology._management import configured_url, management_url, with_credentials
from tests.support.broker import Rabbit

TOPOLOGY = """
[exchanges.orders]
type = "topic"

[queues.billing]
queue_type = "quorum"
bindings = [{ exchange = "orders", routing_key = "order.created" }]
retry = { delays = ["5s"] }

[queues.audit]
queue_type = "classic"
bindings = [{ exchange = "orders", routing_key = "#" }]
retry = false
timeout = "1m"
consumer_timeout = "1h"
arguments = { "x-max-length" = 1000 }
"""


def run_plan(path: Path, url: str, *extra: str) -> Result:
    rabbitflow.cli._register()
    return CliRunner().invoke(
        rabbitflow.cli.cli, ["topology", "plan", str(path), "--url", url, *extra]
    )


def rows(result: Result) -> list[list[str]]:
    """The table rows as [action, kind, name, detail], cut at the header's columns."""
    lines = [line[2:] for line in result.stdout.splitlines() if line.startswith("  ")]
    header = lines[0]
    starts = [header.index(title) for title in ("ACTION", "KIND", "NAME", "DETAIL")]
    ends = [*starts[1:], None]
    return [
        [line[start:end].strip() for start, end in zip(starts, ends, strict=True)]
        for line in lines[1:]
    ]


def row(result: Result, action: str, kind: str, name: str) -> str:
    for found in rows(result):
        if found[:3] == [action, kind, name]:
            return found[3]
    raise AssertionError(f"no {action} {kind} {name} row in:\n{result.stdout}")


@pytest.fixture
def topology_file(tmp_path: Path) -> Path:
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    return path


def run_declare(path: Path, url: str) -> Result:
    rabbitflow.cli._register()
    return CliRunner().invoke(rabbitflow.cli.cli, ["topology", "declare", str(path), "--url", url])


async def _drift(url: str) -> None:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    # a routing key changed by hand, a queue and an exchange the file does not have
    await channel.queue_unbind("billing", "orders", "order.created")
    await channel.queue_bind("billing", "orders", "order.*")
    await channel.exchange_declare("legacy", exchange_type="fanout", durable=True)
    await channel.queue_declare("legacy.jobs", durable=True)
    await channel.queue_bind("legacy.jobs", "orders", "order.#")
    # a retry tier left behind by a change of delays
    await channel.queue_declare(
        "billing.retry.2s", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await connection.close()


async def _hand_made_audit(url: str) -> bool:
    """Declare "audit" by hand; whether it got x-consumer-timeout (RabbitMQ 4.3 refuses it
    on classic queues)."""
    connection = await aiormq.connect(url)
    version = BrokerVersion.from_properties(connection.server_properties)
    timed = version is None or version.accepts_consumer_timeout("classic")
    channel = await connection.channel()
    await channel.queue_declare(
        "audit",
        durable=True,
        arguments={
            "x-queue-type": "classic",
            "x-max-length": 5000,
            "x-message-ttl": 60000,
            "x-dead-letter-exchange": "dlx",
            "x-dead-letter-routing-key": "audit",
            **({"x-consumer-timeout": 60000} if timed else {}),
        },
    )
    await connection.close()
    return timed


@pytest.mark.broker
@pytest.mark.management
def test_plan_sees_every_drift_and_exit_code_makes_it_2(
    rabbit: Rabbit, vhost: str, vhost_url: str, topology_file: Path
) -> None:
    # Given a declared topology, then changed by hand on the broker
    declared = run_declare(topology_file, vhost_url)
    assert declared.exit_code == 0, declared.output
    asyncio.run(_drift(vhost_url))
    rabbit.ctl(
        "set_policy", "-p", vhost, "limits", r"^billing$", '{"max-length": 500}',
        "--apply-to", "queues",
    )  # fmt: skip

    # When plan compares
    result = run_plan(topology_file, vhost_url, "--exit-code")
    print(result.stdout)

    # Then every difference is a row, nothing is changed, and --exit-code exits 2
    assert result.exit_code == 2, result.output
    api = mask_url(with_credentials(configured_url(), vhost_url))
    assert f"through the management API at {api}" in result.stdout
    assert row(result, "change", "binding", "orders -> billing") == (
        "broker routing key 'order.*', file routing key 'order.created': "
        "declare adds the file's; the broker's stays until unbound by hand"
    )
    assert row(result, "not in file", "binding", "orders -> legacy.jobs") == "routing key 'order.#'"
    assert row(result, "not in file", "exchange", "legacy") == "fanout"
    assert row(result, "not in file", "queue", "legacy.jobs").startswith("classic")
    assert "no longer uses" in row(result, "not in file", "queue", "billing.retry.2s")
    assert row(result, "policy", "queue", "billing") == (
        "policy 'limits' (priority 0): max-length = 500 (the file does not set x-max-length)"
    )
    assert row(result, "ok", "binding", "orders -> audit") == "routing key '#'"
    assert (
        result.stdout.splitlines()[-1]
        == ("0 create, 8 ok, 0 conflict, 1 change, 1 policy, 4 not in file")
        or "1 change, 1 policy, 4 not in file" in result.stdout
    )
    assert "differs from" in result.stderr
    # nothing was deleted or unbound
    bindings = rabbit.list(vhost, "bindings", "source_name", "destination_name", "routing_key")
    assert ["orders", "billing", "order.*"] in bindings
    assert "legacy.jobs" in {name for name, *_ in rabbit.list(vhost, "queues", "name")}

    # And without --exit-code the same plan exits 0
    assert run_plan(topology_file, vhost_url).exit_code == 0


@pytest.mark.broker
@pytest.mark.management
def test_every_differing_argument_is_named_with_or_without_management(
    rabbit: Rabbit, vhost: str, vhost_url: str, topology_file: Path
) -> None:
    # Given "audit" declared by hand with three arguments other than the file's
    timed = asyncio.run(_hand_made_audit(vhost_url))

    # When plan runs, through the management API and over AMQP only
    both = run_plan(topology_file, vhost_url)
    amqp = run_plan(topology_file, vhost_url, "--no-management")

    # Then both name every argument declare would fail on, not just the first
    for result in (both, amqp):
        assert result.exit_code == 1, result.output
        detail = row(result, "migrate", "queue", "audit")
        assert "x-max-length: broker 5000, file 1000" in detail
        assert "x-message-ttl: broker 60000, file not set" in detail
    # and the management API shows what RabbitMQ does not compare (3.10 ignores
    # x-consumer-timeout on redeclaration, so declare would keep the broker's value; 4.3
    # refuses it on classic queues, so neither side has it there)
    if timed:
        assert "x-consumer-timeout: broker 60000, file 3600000" in row(
            both, "migrate", "queue", "audit"
        )
    assert "x-consumer-timeout" not in row(amqp, "migrate", "queue", "audit")
    assert amqp.stdout.splitlines()[-1].startswith("note: --no-management: bindings are not")
    # nothing changed: the queue still has the hand-made arguments
    queues = dict(rabbit.list(vhost, "queues", "name", "arguments"))
    assert "5000" in queues["audit"]


@pytest.mark.broker
def test_plan_says_what_it_cannot_see_when_the_management_api_does_not_answer(
    vhost_url: str, topology_file: Path
) -> None:
    result = run_plan(topology_file, vhost_url, "--management-url", "http://127.0.0.1:1/")

    assert result.exit_code == 0, result.output
    assert row(result, "bind", "binding", "orders -> billing") == "routing key 'order.created'"
    assert result.stdout.splitlines()[-1] == (
        "note: the management API at http://guest:***@127.0.0.1:1/ is not reachable "
        "(Connection refused): bindings are not compared (listed as bind), and objects not in "
        "the file, policies and arguments RabbitMQ does not compare on redeclaration are not "
        "shown"
    )
    assert run_plan(topology_file, vhost_url, "--exit-code", "--management-url",
                    "http://127.0.0.1:1/").exit_code == 2  # fmt: skip


# -- without a broker ------------------------------------------------------------------------


def test_the_management_url_follows_the_amqp_url() -> None:
    assert management_url("amqp://app:s3cret@rabbit-1:5672/orders") == (
        "http://app:s3cret@rabbit-1:15672/"
    )
    assert management_url("amqps://rabbit-1/").startswith("https://rabbit-1:15671")
    assert with_credentials("http://mgmt:8080/", "amqp://app:pw@rabbit-1/") == (
        "http://app:pw@mgmt:8080/"
    )
    assert with_credentials("http://ops:x@mgmt/", "amqp://app:pw@rabbit-1/") == "http://ops:x@mgmt/"


def test_the_highest_priority_matching_policy_applies() -> None:
    policies = [
        {"name": "all", "pattern": ".*", "apply-to": "all", "priority": 0, "definition": {}},
        {"name": "billing", "pattern": "^billing", "apply-to": "queues", "priority": 5},
        {"name": "exchanges", "pattern": ".*", "apply-to": "exchanges", "priority": 9},
        {"name": "quorum", "pattern": ".*", "apply-to": "quorum_queues", "priority": 7},
    ]
    assert applied_policy("billing", "classic", policies)["name"] == "billing"  # type: ignore[index]
    assert applied_policy("billing", "quorum", policies)["name"] == "quorum"  # type: ignore[index]
    assert applied_policy("shipping", "classic", policies)["name"] == "all"  # type: ignore[index]


def test_a_boolean_argument_is_not_equal_to_1() -> None:
    spec = QueueSpec("q", "work", "q", arguments={"x-single-active-consumer": True})
    entry = {"type": "classic", "durable": True, "auto_delete": False, "exclusive": False}
    found = differences(spec, entry | {"arguments": {"x-single-active-consumer": 1}})
    assert [str(d) for d in found] == ["x-single-active-consumer: broker 1, file True"]
    queue = derive(parse_topology('[queues.q]\nqueue_type = "classic"\nretry = false\n')).queues[0]
    assert differences(queue, {**entry, "arguments": dict(queue.arguments)}) == []
