"""A changed queue on a live broker: plan classifies each difference (policy, migrate,
conflict), declare is never partial and applies what a policy can carry (issue 28)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from rabbitflow._broker_version import BrokerVersion
from rabbitflow.topology import derive, load_topology
from rabbitflow.topology._changes import classify, verdict
from rabbitflow.topology._declare import declare
from tests.support.broker import Rabbit
from tests.test_plan_drift import row, run_declare, run_plan

pytestmark = pytest.mark.broker

ORDERS = """
[exchanges.orders]
type = "topic"

[queues."billing.order-created"]
queue_type = "{queue_type}"
bindings = [{{ exchange = "orders", routing_key = "order.created" }}]
retry = {{ delays = ["5s"] }}
{extra}
"""
NEW_EXCHANGE = """
[exchanges.invoices]
type = "fanout"
"""


def write(tmp_path: Path, queue_type: str, extra: str = "", name: str = "topology.toml") -> Path:
    path = tmp_path / name
    path.write_text(ORDERS.format(queue_type=queue_type, extra=extra), encoding="utf-8")
    return path


async def _publish(url: str, count: int) -> int:
    """Publish ``count`` messages with confirms; how many the broker refused (nack)."""
    refused = 0
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("orders")
        for index in range(count):
            try:
                await exchange.publish(
                    aio_pika.Message(b"{}", message_id=str(index)), routing_key="order.created"
                )
            except aiormq.exceptions.DeliveryError:
                refused += 1
    return refused


async def _depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


def depth(url: str, queue: str) -> int:
    """Ready messages of ``queue``, as a passive declare answers (rabbitmqctl's figures of a
    quorum queue lag on 3.10)."""
    return asyncio.run(_depth(url, queue))


def policies(rabbit: Rabbit, vhost: str) -> dict[str, dict[str, Any]]:
    """The vhost's policies as rabbitmqctl lists them."""
    rows = json.loads(rabbit.ctl("list_policies", "-p", vhost, "--formatter", "json") or "[]")
    return {row["name"]: row for row in rows}


def exchanges(rabbit: Rabbit, vhost: str) -> set[str]:
    return {row[0] for row in rabbit.list(vhost, "exchanges", "name")}


def test_a_type_change_is_named_and_nothing_is_declared(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    # Given billing.order-created declared as a quorum queue
    assert run_declare(write(tmp_path, "quorum"), vhost_url).exit_code == 0
    # When the file makes it classic and adds an exchange
    changed = write(tmp_path, "classic", NEW_EXCHANGE, "changed.toml")
    result = run_declare(changed, vhost_url)

    # Then declare fails on the real change, with both values and the command that resolves it
    assert result.exit_code == 1, result.output
    assert "x-queue-type: broker 'quorum', file 'classic'" in result.stderr
    assert f"rabbitflow topology migrate {changed} billing.order-created" in result.stderr
    assert "x-dead-letter-strategy" not in result.stderr
    assert "Traceback" not in result.output
    # and nothing was declared: the file's new exchange does not exist
    assert "invoices" not in exchanges(rabbit, vhost)

    # And plan shows one migrate row per queue whose type changes, without the noise of the
    # arguments rabbitflow derives from the type
    planned = run_plan(changed, vhost_url)
    assert planned.exit_code == 1, planned.output
    assert row(planned, "migrate", "queue", "billing.order-created") == (
        "x-queue-type: broker 'quorum', file 'classic' (needs `rabbitflow topology migrate`)"
    )
    assert f"rabbitflow topology migrate {changed} billing.order-created" in planned.stderr


@pytest.mark.management
def test_a_max_length_is_applied_as_a_policy_without_moving_a_message(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    # Given a declared queue holding 20 messages
    assert run_declare(write(tmp_path, "quorum"), vhost_url).exit_code == 0
    asyncio.run(_publish(vhost_url, 20))
    # When the file adds x-max-length
    changed = write(tmp_path, "quorum", 'arguments = { "x-max-length" = 50 }', "changed.toml")
    planned = run_plan(changed, vhost_url)
    assert planned.exit_code == 0, planned.output
    assert row(planned, "policy", "queue", "billing.order-created") == (
        "x-max-length: broker not set, file 50 "
        "(declare applies policy 'rabbitflow.billing.order-created')"
    )
    result = run_declare(changed, vhost_url)

    # Then declare applies it as rabbitflow's policy of that queue only, and moves nothing
    assert result.exit_code == 0, result.output
    ours = policies(rabbit, vhost)["rabbitflow.billing.order-created"]
    definition = ours["definition"]
    assert (json.loads(definition) if isinstance(definition, str) else definition) == {
        "max-length": 50
    }
    assert ours["pattern"] == r"^billing\.order\-created$"
    assert ours["apply-to"] == "queues"
    assert depth(vhost_url, "billing.order-created") == 20
    # and the queue refuses publishes past 50 from now on (reject-publish; a quorum queue
    # checks the limit before the last write, so one more may get in)
    assert asyncio.run(_publish(vhost_url, 60)) >= 29
    assert 50 <= depth(vhost_url, "billing.order-created") <= 51
    # And the next plan is ok
    again = run_plan(changed, vhost_url, "--exit-code")
    assert again.exit_code == 0, again.output
    assert row(again, "ok", "queue", "billing.order-created") == (
        "x-max-length 50 by policy 'rabbitflow.billing.order-created'"
    )


@pytest.mark.management
def test_a_policy_of_the_users_is_not_clobbered(
    rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path
) -> None:
    assert run_declare(write(tmp_path, "quorum"), vhost_url).exit_code == 0
    rabbit.ctl(
        "set_policy", "-p", vhost, "ops", "^billing", '{"max-length-bytes": 100000000}',
        "--apply-to", "queues",
    )  # fmt: skip
    changed = write(tmp_path, "quorum", 'arguments = { "x-max-length" = 50 }', "changed.toml")

    planned = run_plan(changed, vhost_url)
    result = run_declare(changed, vhost_url)

    assert planned.exit_code == 1, planned.output
    assert "policy 'ops' (priority 0) already applies" in row(
        planned, "conflict", "queue", "billing.order-created"
    )
    assert result.exit_code == 1
    assert "policy 'ops' (priority 0) already applies" in result.stderr
    assert set(policies(rabbit, vhost)) == {"ops"}


# -- without a broker ------------------------------------------------------------------------


def test_classification() -> None:
    v310, v43 = BrokerVersion(3, 10), BrokerVersion(4, 3)

    def how(*diffs: tuple[str, object, object], version: BrokerVersion = v310) -> list[str]:
        return [
            f"{c.argument}:{c.how}" for c in classify(list(diffs), kind="queue", version=version)
        ]

    # a type change hides the arguments rabbitflow derives from the type
    assert how(
        ("x-dead-letter-strategy", "at-least-once", None),
        ("x-queue-type", "quorum", "classic"),
        ("x-overflow", "reject-publish", None),
        ("x-delivery-limit", 10, None),
    ) == ["x-queue-type:migrate"]
    # a default on one side is no difference
    assert how(("x-overflow", None, "drop-head")) == []
    # a policy adds what the queue lacks, or lowers what the lower of two applies to
    assert how(("x-max-length", None, 10)) == ["x-max-length:policy"]
    assert how(("x-max-length", 100, 10)) == ["x-max-length:policy"]
    assert how(("x-max-length", 10, 100)) == ["x-max-length:migrate"]
    assert how(("x-dead-letter-exchange", "old", "new")) == ["x-dead-letter-exchange:migrate"]
    assert how(("x-max-length", 10, None)) == ["x-max-length:migrate"]
    assert how(("x-consumer-timeout", None, 1000)) == ["x-consumer-timeout:migrate"]
    assert how(("x-consumer-timeout", None, 1000), version=v43) == ["x-consumer-timeout:policy"]
    assert how(("durable", False, True)) == ["durable:migrate"]
    assert how(("x-queue-type", "quorum", "stream")) == ["x-queue-type:conflict"]
    assert how(("exclusive", True, False)) == ["exclusive:conflict"]
    changes = classify([("x-max-length", None, 1), ("durable", False, True)], kind="queue",
                       version=v310)  # fmt: skip
    assert verdict(changes) == "migrate"


async def test_a_worker_keeps_a_queue_a_policy_would_change(vhost_url: str, tmp_path: Path) -> None:
    # rabbitflow run declares without the management API: it applies no policy, keeps the
    # queue as it is, and still declares the rest of the file
    original = derive(load_topology(write(tmp_path, "quorum")))
    changed = write(tmp_path, "quorum", 'arguments = { "x-max-length" = 50 }' + NEW_EXCHANGE,
                    "changed.toml")  # fmt: skip
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        await declare(connection, original)
        done = await declare(connection, derive(load_topology(changed)))
        channel = await connection.channel()
        await channel.get_exchange("invoices")  # declared: a passive declare finds it

    assert "exchange invoices (fanout)" in [str(d) for d in done]
