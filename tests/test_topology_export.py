"""export: definitions that RabbitMQ imports into the same objects declare creates; Mermaid."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from rabbitflow.topology import Declarations, derive, load_topology, parse_topology
from rabbitflow.topology._export import ExportWarning, definitions, mermaid
from tests.support.broker import Rabbit
from tests.test_topology_broker import EXAMPLE, broker_state, object_names, run_cli


def derive_example() -> Declarations:
    return derive(load_topology(EXAMPLE))


@pytest.fixture
def readable_file() -> Iterator[Path]:
    """A file in the system temp dir that rabbitmqctl can read: the rabbitmqctl wrapper may run
    as the rabbitmq user, who cannot enter pytest's private tmp_path."""
    handle, name = tempfile.mkstemp(prefix="rabbitflow-definitions-", suffix=".json")
    os.close(handle)
    path = Path(name)
    path.chmod(0o644)
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.broker
def test_imported_definitions_equal_a_declared_vhost(
    rabbit: Rabbit, vhost: str, vhost_url: str, readable_file: Path
) -> None:
    with rabbit.vhost() as imported:
        exported = run_cli(
            "topology", "export", str(EXAMPLE), "--format", "definitions",
            "--vhost", imported, "--output", str(readable_file),
        )  # fmt: skip
        assert exported.exit_code == 0, exported.output
        rabbit.ctl("import_definitions", str(readable_file))
        declared = run_cli("topology", "declare", str(EXAMPLE), "--url", vhost_url)
        assert declared.exit_code == 0, declared.output

        assert broker_state(rabbit, imported) == broker_state(rabbit, vhost)
        assert len(broker_state(rabbit, imported)["queues"]) == len(derive_example().queues)


def test_definitions_carry_the_vhost_on_every_object() -> None:
    document = definitions(derive_example(), vhost="orders-prod")

    assert set(document) == {"exchanges", "queues", "bindings"}
    for kind in ("exchanges", "queues", "bindings"):
        assert {entry["vhost"] for entry in document[kind]} == {"orders-prod"}
    tier = next(q for q in document["queues"] if q["name"] == "billing.order-created.retry.5m")
    assert tier["arguments"]["x-message-ttl"] == 300_000
    assert json.loads(json.dumps(document)) == document


def test_exclusive_queues_are_skipped_with_a_warning() -> None:
    topology = parse_topology(
        '[exchanges.e]\ntype = "fanout"\n'
        '[queues.mine]\nqueue_type = "classic"\nexclusive = true\nbindings = [{ exchange = "e" }]\n'
    )

    with pytest.warns(ExportWarning, match="queue 'mine' is exclusive"):
        document = definitions(derive(topology))

    assert "mine" not in [q["name"] for q in document["queues"]]
    assert "mine.dlq" in [q["name"] for q in document["queues"]]
    assert all(b["destination"] != "mine" for b in document["bindings"])


def test_definitions_of_a_plain_topology_warn_about_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        definitions(derive_example())


def test_mermaid_shows_every_object_and_the_paths_between_them() -> None:
    declarations = derive_example()

    chart = mermaid(declarations)

    assert chart.startswith("flowchart LR\n")
    for _kind, name in object_names(declarations):
        assert f'"{name}' in chart, name
    ids = {
        name: node for node, name in re.findall(r'^\s+(\w+)[\[({]+"([^" ]+)', chart, re.MULTILINE)
    }
    queue, tier, dlq = (
        ids["billing.order-created"],
        ids["billing.order-created.retry.30s"],
        ids["billing.order-created.dlq"],
    )
    assert f'{queue} -.->|"retry"| {tier}' in chart
    assert f'{tier} -.->|"TTL 30s"| {queue}' in chart
    assert f'{queue} -.->|"dead-letter"| {ids["dlx"]}' in chart
    assert f'{ids["dlx"]} -->|"billing.order-created"| {dlq}' in chart
    assert f'{ids["orders"]} -->|"order.created"| {queue}' in chart
