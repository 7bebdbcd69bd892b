"""``rabbitflow docs asyncapi``: an AsyncAPI 3.0 document of an app, checked structurally.

No package on PyPI ships the official AsyncAPI 3.0 JSON Schema, so ``check_document`` checks
what that schema and the specification require of what we emit: the version and info fields,
key syntax, that every ``$ref`` resolves, that each operation's channel exists and its messages
belong to that channel, and the fields of the AMQP 0.3.0 channel bindings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from rabbitflow import App, Message
from rabbitflow._asyncapi import build
from rabbitflow.cli import _register, cli
from rabbitflow.topology import parse_topology

KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")
EXCHANGE_TYPES = {"default", "direct", "topic", "fanout", "headers"}

TOPOLOGY = """
[broker]
url = "amqp://app:s3cret@rabbit.internal:5672/shop"

[exchanges.orders]
type = "topic"

[exchanges."orders.audit"]
type = "fanout"
bindings = [{ exchange = "orders", routing_key = "#" }]

[queues."billing.order-created"]
bindings = [{ exchange = "orders", routing_key = "order.created" }]
retry = { delays = ["5s", "30s"], max_attempts = 4 }
timeout = "30s"

[queues."audit.all"]
queue_type = "classic"
bindings = [{ exchange = "orders.audit" }]
retry = false
"""


class Address(BaseModel):
    city: str


class OrderCreated(BaseModel):
    order_id: int
    amount: float
    ship_to: Address


def make_app() -> App:
    app = App(name="shop")

    @app.consumer("billing.order-created")
    async def bill(order: OrderCreated, message: Message) -> None:
        """Charge the customer for a new order."""

    @app.consumer("audit.all")
    async def audit(event: dict[str, Any]) -> None: ...

    return app


# -- the structural check ------------------------------------------------------------------


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are emitted: {ref}"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref} does not resolve"
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def check_amqp_binding(name: str, binding: dict[str, Any]) -> None:
    assert binding["bindingVersion"] == "0.3.0"
    if binding["is"] == "routingKey":
        exchange = binding["exchange"]
        assert exchange["type"] in EXCHANGE_TYPES, name
        assert isinstance(exchange["name"], str)
        assert len(exchange["name"]) <= 255
        assert isinstance(exchange["durable"], bool)
        assert isinstance(exchange["autoDelete"], bool)
        assert isinstance(exchange["vhost"], str)
    else:
        assert binding["is"] == "queue", name
        queue = binding["queue"]
        for flag in ("durable", "exclusive", "autoDelete"):
            assert isinstance(queue[flag], bool), f"{name}: {flag}"
        assert isinstance(queue["name"], str)
        assert isinstance(queue["vhost"], str)


def check_document(document: dict[str, Any]) -> None:
    """Raise AssertionError where ``document`` breaks AsyncAPI 3.0.0 rules."""
    assert document["asyncapi"] == "3.0.0"
    assert isinstance(document["info"]["title"], str)
    assert document["info"]["title"]
    assert isinstance(document["info"]["version"], str)
    assert document["info"]["version"]
    json.dumps(document)  # JSON all the way down
    for section in ("channels", "operations"):
        for name in document.get(section, {}):
            assert KEY.match(name), f"{section} key {name!r}"
    for kind, entries in document.get("components", {}).items():
        for name in entries:
            assert KEY.match(name), f"components.{kind} key {name!r}"
    for ref in refs(document):
        resolve(document, ref)
    for name, channel in document["channels"].items():
        assert isinstance(channel["address"], str)
        check_amqp_binding(name, channel["bindings"]["amqp"])
    for name, operation in document["operations"].items():
        assert operation["action"] in ("send", "receive"), name
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/"), name
        for message in operation.get("messages", []):
            # The specification: an operation's messages MUST be a subset of its channel's.
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
    for name, message in document["components"]["messages"].items():
        assert "payload" in message, name


def test_the_check_catches_what_it_looks_for() -> None:
    document = build(make_app(), parse_topology(TOPOLOGY))
    check_document(document)
    broken = json.loads(json.dumps(document))
    broken["operations"]["receive.audit.all"]["channel"] = {"$ref": "#/channels/nowhere"}
    with pytest.raises(AssertionError, match="does not resolve"):
        check_document(broken)
    foreign = json.loads(json.dumps(document))
    receive = foreign["operations"]["receive.audit.all"]
    receive["messages"] = [{"$ref": "#/channels/exchange.orders/messages/OrderCreated"}]
    with pytest.raises(AssertionError, match=r"receive\.audit\.all"):
        check_document(foreign)


# -- what the document says ----------------------------------------------------------------


@pytest.fixture
def document() -> dict[str, Any]:
    result = build(make_app(), parse_topology(TOPOLOGY), version="2.1.0")
    check_document(result)
    return result


def test_exchanges_and_queues_are_channels_with_amqp_bindings(document: dict[str, Any]) -> None:
    channels = document["channels"]
    assert channels["exchange.orders"]["bindings"]["amqp"]["exchange"] == {
        "name": "orders",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "shop",
    }
    billing = channels["queue.billing.order-created"]
    assert billing["address"] == "billing.order-created"
    assert billing["bindings"]["amqp"]["queue"]["durable"] is True
    assert "orders (routing key 'order.created')" in billing["description"]
    assert "receives from orders" in channels["exchange.orders.audit"]["description"]


def test_retry_tiers_and_the_dlq_are_described(document: dict[str, Any]) -> None:
    channels = document["channels"]
    tier = channels["queue.billing.order-created.retry.30s"]
    assert "waits 30s" in tier["description"]
    assert tier["x-rabbitflow-arguments"]["x-message-ttl"] == 30_000
    dlq = channels["queue.billing.order-created.dlq"]
    assert list(dlq["messages"]) == ["OrderCreated.dead-letter"]
    headers = document["components"]["messages"]["OrderCreated.dead-letter"]["headers"]
    assert "rabbitflow-error-type" in headers["properties"]
    retry = document["operations"]["receive.billing.order-created"]["x-rabbitflow-retry"]
    assert retry["maxAttempts"] == 4
    assert retry["delays"] == ["5s", "30s"]
    assert [t["$ref"] for t in retry["tiers"]] == [
        "#/channels/queue.billing.order-created.retry.5s",
        "#/channels/queue.billing.order-created.retry.30s",
    ]
    assert "queue.audit.all.retry" not in " ".join(channels)


def test_handlers_are_receive_operations_with_their_payload_schema(
    document: dict[str, Any],
) -> None:
    receive = document["operations"]["receive.billing.order-created"]
    assert receive["action"] == "receive"
    assert receive["summary"] == "Charge the customer for a new order."
    assert receive["x-rabbitflow-timeout"] == "30s"
    schemas = document["components"]["schemas"]
    assert schemas["OrderCreated"]["properties"]["order_id"]["type"] == "integer"
    assert schemas["OrderCreated"]["required"] == ["order_id", "amount", "ship_to"]
    assert schemas["OrderCreated"]["properties"]["ship_to"] == {
        "$ref": "#/components/schemas/Address"
    }
    assert schemas["Address"]["properties"]["city"]["type"] == "string"
    audit = document["components"]["messages"]["audit.all.payload"]
    assert audit["payload"] == {"type": "object"}


def test_exchanges_that_reach_a_handler_are_send_operations(document: dict[str, Any]) -> None:
    operations = document["operations"]
    sends = {name for name, op in operations.items() if op["action"] == "send"}
    assert sends == {"send.orders", "send.orders.audit"}
    orders = [m["$ref"] for m in operations["send.orders"]["messages"]]
    # billing and (through the exchange-to-exchange binding) audit both take from orders
    assert orders == [
        "#/channels/exchange.orders/messages/OrderCreated",
        "#/channels/exchange.orders/messages/audit.all.payload",
    ]


def test_the_server_comes_from_the_url_without_credentials(document: dict[str, Any]) -> None:
    assert document["servers"] == {
        "broker": {"host": "rabbit.internal:5672", "protocol": "amqp", "pathname": "/shop"}
    }
    assert "s3cret" not in json.dumps(document)
    assert document["info"] == {
        "title": "shop",
        "version": "2.1.0",
        "description": "Generated by rabbitflow from <string>.",
    }


# -- the command ---------------------------------------------------------------------------


def test_the_command_writes_the_document(tmp_path: Path) -> None:
    _register()
    output = tmp_path / "asyncapi.json"
    result = CliRunner().invoke(
        cli,
        [
            "docs",
            "asyncapi",
            "tests.apps.orders:app",
            "--topology",
            "topology.toml",
            "-o",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(output.read_text())
    check_document(document)
    assert "receive.support.vip-orders" in document["operations"]


def test_the_command_reports_a_bad_import_string() -> None:
    _register()
    result = CliRunner().invoke(cli, ["docs", "asyncapi", "tests.apps.orders:nope"])
    assert result.exit_code == 1
    assert "has no attribute 'nope'" in result.output
