"""Dead letters the broker holds are reported by every surface (real broker + management API).

A quorum work queue past its ``crash_limit`` dead-letters at-least-once: while its DLQ
refuses (a ``max-length`` with ``reject-publish``, as an operator's policy might set), the
broker keeps the messages in the work queue's ``messages_dlx``: not ready, not in the DLQ,
invisible to AMQP. The worker's monitor, ``dlq list``, ``retries list`` and the console
must each say how many are held.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq
import httpx
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from rabbitflow._held import read_held
from rabbitflow._metrics import Metrics
from rabbitflow._retries import TierMonitor
from rabbitflow.cli import cli
from rabbitflow.console import ConsoleSettings, create_app
from rabbitflow.topology import derive, load_topology
from rabbitflow.topology._declare import declare
from rabbitflow.topology._management import (
    configured_url,
    queue_depths,
    vhost_of,
    with_credentials,
)
from tests.support.amqp import return_until_dead_lettered
from tests.support.broker import Rabbit
from tests.support.waiting import eventually

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.management]

TOPOLOGY = """
[queues.work]
queue_type = "quorum"
crash_limit = 2
retry = { delays = ["1h"] }
"""
HELD = 3
LABEL = "held by the broker's dead-lettering"


@dataclass(frozen=True)
class Scene:
    url: str
    api_url: str
    topology_file: Path


@pytest.fixture
async def held(rabbit: Rabbit, vhost: str, vhost_url: str, tmp_path: Path) -> Scene:
    """Three messages of ``work`` held by the broker: past crash_limit, refused by work.dlq."""
    api_url = with_credentials(configured_url(), vhost_url)
    management = rabbit.broker.management
    assert management is not None, "the management marker promises the API"
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    declarations = derive(load_topology(path))
    where = quote(vhost, safe="")
    refuse = {"max-length": 0, "overflow": "reject-publish"}
    management.request(
        "PUT",
        f"policies/{where}/refuse",
        {"pattern": r"^work\.dlq$", "definition": refuse, "apply-to": "queues"},
    )
    async with await aio_pika.connect(vhost_url) as connection:
        await declare(connection, declarations)
        channel = await connection.channel()
        # A quorum queue checks its limit after an enqueue: one filler puts the DLQ over it.
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key="work.dlq")
        for n in range(HELD):
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", message_id=f"m{n}"), routing_key="work"
            )
        # Each message taken and given back by closing the channel, as a crashing worker
        # would, until the broker dead-letters them (past x-delivery-limit).
        await return_until_dead_lettered(connection, "work")
    depths = functools.partial(queue_depths, api_url, vhost_of(vhost_url))

    async def held_by_the_broker() -> bool:
        return bool((await depths())["work"]["messages_dlx"] == HELD)

    # the management statistics lag by up to 5 s
    await eventually(held_by_the_broker, f"the broker to hold {HELD} messages", 15, 0.25)
    return Scene(vhost_url, api_url, path)


async def test_the_worker_warns_with_the_count_and_for_how_long(held: Scene) -> None:
    # Given the worker's monitor of `work`, sampling through the management API
    metrics = Metrics()
    depths = functools.partial(queue_depths, held.api_url, vhost_of(held.url))
    declarations = derive(load_topology(held.topology_file))
    monitor = TierMonitor([declarations.routes["work"]], metrics, interval=1.0, depths=depths)

    # When it samples three times, an interval apart
    amqp = await aiormq.connect(held.url)
    try:
        with capture_logs() as logs:
            for _ in range(3):
                await monitor.sample(await amqp.channel())
                await asyncio.sleep(1.05)
    finally:
        await amqp.close()

    # Then from the second sample on it warns about `work` with the count and for how long
    # they have been held, and exports the gauge
    warnings = [line for line in logs if line["log_level"] == "warning"]
    assert [line["held_in"] for line in warnings] == ["work", "work"], logs
    assert [line["messages"] for line in warnings] == [HELD, HELD]
    assert "held by its dead-lettering" in warnings[0]["event"]
    ages = [line["for_s"] for line in warnings]
    assert ages[0] >= 1
    assert ages[1] > ages[0]
    assert f'rabbitflow_broker_held_messages{{queue="work"}} {HELD}' in metrics.render()
    assert 'rabbitflow_broker_held_messages{queue="work.retry.1h"} 0' in metrics.render()


def test_dlq_list_shows_them(held: Scene) -> None:
    # When the operator lists the DLQ, which holds only the filler
    args = ["dlq", "list", "work", "--url", held.url, "--management-url", held.api_url]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    # Then the listing says that three more are held on their way to it
    lines = result.output.splitlines()
    assert lines[0] == "work.dlq: 1 message"
    assert f"  work: {LABEL}: {HELD} (in no queue;" in lines[1]

    document = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert document["held_by_broker"] == {
        "counts": {"work": HELD, "work.dlq": 0},
        "problem": None,
    }


def test_retries_list_shows_them(held: Scene) -> None:
    args = ["retries", "list", "work", "--url", held.url, "--topology", str(held.topology_file)]
    result = CliRunner().invoke(cli, [*args, "--management-url", held.api_url])
    assert result.exit_code == 0, result.output
    assert f"work: {LABEL}: {HELD} (in no queue;" in result.output

    # Without a management API, the listing says the count was not checked, and why
    nowhere = CliRunner().invoke(cli, [*args, "--management-url", "http://127.0.0.1:9/"])
    assert nowhere.exit_code == 0, nowhere.output
    assert f"{LABEL}: not checked (management API at" in nowhere.output
    assert "127.0.0.1:9" in nowhere.output


async def test_the_console_shows_them(held: Scene) -> None:
    topology = load_topology(held.topology_file)
    app = create_app(ConsoleSettings(url=held.url, topology=topology, management_url=held.api_url))
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            page = (await http.get("/")).text
    finally:
        await app.state.console.link.close()
    badge = re.search(r'data-held="work"[^>]*>([^<]*)</span>', page)
    assert badge, page
    assert badge.group(1) == f"{LABEL}: {HELD}"
    assert 'data-held="work.dlq"' not in page  # the DLQ itself holds nothing


async def test_read_held_names_an_unreachable_api(vhost_url: str) -> None:
    held = await read_held(vhost_url, "http://127.0.0.1:9/")
    assert held.of("work") is None
    assert held.problem is not None
    assert "127.0.0.1:9" in held.problem
