"""``consumer_timeout`` on every RabbitMQ version, and consumers the broker cancels.

RabbitMQ 4.3 refuses ``x-consumer-timeout`` on classic queues and streams (it never times
their consumers out), takes it as a ``basic.consume`` argument on quorum queues, and answers a
timed-out quorum delivery with ``basic.cancel`` instead of closing the channel. Older releases
accept the queue argument everywhere (enforced from 3.12, once per channel tick) and close
the channel. rabbitflow declares only what the broker accepts and consumes again after a
broker-sent cancel.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from rabbitflow import App, Message
from rabbitflow._broker_version import BrokerVersion
from rabbitflow._consumers import _consume_arguments
from rabbitflow.cli import cli
from rabbitflow.topology import derive, parse_topology
from rabbitflow.topology._declare import declare
from rabbitflow.topology._derived import consumer_timeout_use, for_broker
from tests.support.amqp import message_counts_async
from tests.support.broker import Rabbit, broker_version
from tests.support.worker import running

V3_10, V4_0, V4_3 = BrokerVersion(3, 10, 8), BrokerVersion(4, 0, 5), BrokerVersion(4, 3, 6)
BOTH = (
    '[exchanges.in]\ntype = "direct"\n'
    '[queues.ledger]\nqueue_type = "classic"\ntimeout = "10m"\nconsumer_timeout = "15m"\n'
    'bindings = [{ exchange = "in", routing_key = "ledger" }]\n'
    '[queues.billing]\ntimeout = "50m"\nconsumer_timeout = "1h"\n'
    'bindings = [{ exchange = "in", routing_key = "billing" }]\n'
)


def _work(version: BrokerVersion | None, name: str) -> dict[str, Any]:
    declarations = for_broker(derive(parse_topology(BOTH)), version)
    return next(q.arguments for q in declarations.queues if q.name == name)


# -- offline ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "classic", "quorum", "on_consume"),
    [
        (V3_10, True, True, False),  # accepted and kept, not enforced before 3.12
        (V4_0, True, True, False),  # enforced per channel tick
        (V4_3, False, True, True),  # refused on classic queues; consumer argument on quorum
    ],
)
def test_the_queue_argument_is_declared_only_where_the_broker_accepts_it(
    version: BrokerVersion, classic: bool, quorum: bool, on_consume: bool
) -> None:
    assert ("x-consumer-timeout" in _work(version, "ledger")) is classic
    assert _work(version, "billing").get("x-consumer-timeout") == (3_600_000 if quorum else None)
    config = parse_topology(BOTH).queues["billing"]
    expected = {"x-consumer-timeout": 3_600_000} if on_consume else None
    assert _consume_arguments(config, version) == expected
    # A classic queue never gets the consumer argument: 4.3 refuses it there too.
    assert _consume_arguments(parse_topology(BOTH).queues["ledger"], version) is None


def test_an_unknown_version_changes_nothing() -> None:
    assert _work(None, "ledger")["x-consumer-timeout"] == 900_000


def test_plan_and_validate_say_what_takes_effect_on_each_version() -> None:
    classic = next(q for q in derive(parse_topology(BOTH)).queues if q.name == "ledger")
    assert "not enforced before RabbitMQ 3.12" in str(consumer_timeout_use(classic, V3_10))
    assert "closes the channel" in str(consumer_timeout_use(classic, V4_0))
    assert "never times out consumers of classic queues" in str(consumer_timeout_use(classic, V4_3))


def test_validate_checks_a_file_against_a_broker_version(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(
        BOTH + '[queues.old]\nqueue_type = "classic"\n'
        'arguments = { "x-queue-master-locator" = "min-masters" }\n'
    )
    runner = CliRunner()

    on_4_0 = runner.invoke(cli, ["topology", "validate", str(path), "--broker-version", "4.0"])
    on_4_3 = runner.invoke(cli, ["topology", "validate", str(path), "--broker-version", "4.3.6"])
    bad = runner.invoke(cli, ["topology", "validate", str(path), "--broker-version", "four"])
    plain = runner.invoke(cli, ["topology", "validate", str(path)])

    assert on_4_0.exit_code == 0, on_4_0.output
    assert "valid for RabbitMQ 4.0" in on_4_0.output
    assert "note: queues.ledger: consumer_timeout 15m: queue argument" in on_4_0.output
    assert on_4_3.exit_code == 1, on_4_3.output
    assert 'queues.old.arguments."x-queue-master-locator": refused by RabbitMQ 4.3' in (
        on_4_3.output
    )
    assert bad.exit_code == 2
    assert "not a RabbitMQ version" in bad.output
    assert plain.exit_code == 0, plain.output


# -- on the broker ---------------------------------------------------------------------------


async def _queue_arguments(url: str, name: str, rabbit: Rabbit, vhost: str) -> str:
    rows = rabbit.list(vhost, "queues", "name", "arguments")
    return next(row[1] for row in rows if row[0] == name)


@pytest.mark.broker
async def test_a_classic_and_a_quorum_queue_with_consumer_timeout_declare_on_this_broker(
    rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    # Given a classic and a quorum queue with their own consumer_timeout
    version = await broker_version(vhost_url)
    connection = await aio_pika.connect(vhost_url)
    try:
        # When the topology is declared (twice: redeclaring is a no-op)
        await declare(connection, derive(parse_topology(BOTH)))
        await declare(connection, derive(parse_topology(BOTH)))
    finally:
        await connection.close()

    # Then both exist; the classic one carries the argument only where the broker takes it
    classic = await _queue_arguments(vhost_url, "ledger", rabbit, vhost)
    quorum = await _queue_arguments(vhost_url, "billing", rabbit, vhost)
    assert ("x-consumer-timeout" in classic) is version.accepts_consumer_timeout("classic")
    assert "x-consumer-timeout" in quorum


SLOW = (
    '[exchanges.in]\ntype = "direct"\n'
    '[queues.slow]\nprefetch = 5\nretry = { delays = ["1s"] }\n'
    'bindings = [{ exchange = "in", routing_key = "slow" }]\n'
)


@pytest.mark.broker
@pytest.mark.slow
async def test_a_handler_slower_than_the_consumer_timeout_loses_nothing_on_4_3(
    tmp_path: Path, rabbit: Rabbit, vhost: str, vhost_url: str
) -> None:
    if not (await broker_version(vhost_url)).cancels_timed_out_consumers:
        pytest.skip(
            "before RabbitMQ 4.3 a consumer timeout closes the channel (docs/reliability.md 9b)"
        )
    # Given a consumer timeout of 1 s on a quorum queue (a policy, as an operator would set),
    # and a handler that takes 2.5 s the first time it sees message 1
    rabbit.ctl(
        "set_policy", "-p", vhost, "timeout", "^slow$", '{"consumer-timeout": 1000}',
        "--apply-to", "queues",
    )  # fmt: skip
    (tmp_path / "topology.toml").write_text(SLOW)
    app = App(name="ct", topology=str(tmp_path / "topology.toml"))
    runs: Counter[str] = Counter()
    redelivered: list[str] = []

    @app.consumer("slow")
    async def handle(body: bytes, message: Message) -> None:
        key = body.decode()
        runs[key] += 1
        if message.redelivered:
            redelivered.append(key)
        if key == "1" and runs[key] == 1:
            await asyncio.sleep(2.5)

    with capture_logs() as logs:
        async with running(app, vhost_url) as worker:
            # When five messages arrive
            await _publish(vhost_url, ["1", "2", "3", "4", "5"])
            await _until(lambda: runs["1"] >= 2 and all(runs[k] for k in "2345"), 15)
            await asyncio.sleep(2.0)  # the first, slow run of message 1 ends and acks late
            # Then the worker still consumes what comes next, on the same connection
            later = [str(n) for n in range(6, 16)]
            await _publish(vhost_url, later)
            await _until(lambda: all(runs[k] for k in later), 10)
            assert worker.reconnections == 0

    # Then message 1 was delivered once more (returned by the broker), nothing ran a third
    # time, and nothing is left behind: no message sits unacked on a cancelled consumer tag
    assert runs["1"] == 2, runs
    assert "1" in redelivered, redelivered
    assert all(runs[str(n)] == 1 for n in range(2, 16)), runs
    counts = await message_counts_async(vhost_url, ["slow", "slow.dlq", "slow.retry.1s"])
    assert counts == {"slow": 0, "slow.dlq": 0, "slow.retry.1s": 0}
    cancels = [e for e in logs if e["event"].startswith("the broker cancelled the consumer")]
    assert cancels, logs
    assert cancels[0]["log_level"] == "warning"
    assert cancels[0]["queue"] == "slow"
    assert "consumer timeout" in cancels[0]["reason"]


async def _publish(url: str, bodies: list[str]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange("in")
        for body in bodies:
            await exchange.publish(aio_pika.Message(body.encode()), routing_key="slow")
    finally:
        await connection.close()


async def _until(probe: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.broker
def test_plan_says_how_consumer_timeout_takes_effect_on_the_broker(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given the two queues, and the broker's version
    version = asyncio.run(broker_version(vhost_url))
    path = tmp_path / "topology.toml"
    path.write_text(BOTH)

    # When plan runs against the broker (over AMQP only)
    result = CliRunner().invoke(
        cli, ["topology", "plan", str(path), "--url", vhost_url, "--no-management"]
    )

    # Then each queue's consumer_timeout is explained for this version, and nothing conflicts
    assert result.exit_code == 0, result.output
    classic = next(q for q in derive(parse_topology(BOTH)).queues if q.name == "ledger")
    assert f"note: queue ledger: {consumer_timeout_use(classic, version)}" in result.output
    assert "note: queue billing: consumer_timeout 1h:" in result.output


def test_definitions_for_4_3_leave_out_what_it_refuses(tmp_path: Path) -> None:
    # Given the two queues
    path = tmp_path / "topology.toml"
    path.write_text(BOTH)
    export = ["topology", "export", str(path), "--format", "definitions"]

    # When definitions are written for 4.3, and for no version in particular
    for_4_3 = CliRunner().invoke(cli, [*export, "--broker-version", "4.3"])
    neutral = CliRunner().invoke(cli, export)

    # Then 4.3's keep the quorum queue's timeout only; the neutral ones warn about 4.3
    queues = {q["name"]: q["arguments"] for q in json.loads(for_4_3.stdout)["queues"]}
    assert "x-consumer-timeout" not in queues["ledger"]
    assert queues["billing"]["x-consumer-timeout"] == 3_600_000
    assert "refuse x-consumer-timeout on classic queues and streams: ledger" in neutral.stderr
    assert "x-consumer-timeout" in json.loads(neutral.stdout)["queues"][0]["arguments"]
