"""The AsyncAPI document shows the replies of handlers that return a value."""

from __future__ import annotations

from rabbitflow import App
from rabbitflow._asyncapi import build
from tests.test_asyncapi import check_document
from tests.test_rpc import TOPOLOGY, Quote, QuoteRequest


def make_app() -> App:
    app = App(name="pricing")

    @app.consumer("pricing.quotes")
    async def price(req: QuoteRequest) -> Quote:
        """Quote a price."""
        return Quote(sku=req.sku, price=1.0)

    @app.consumer("pricing.events")
    async def changed(req: QuoteRequest) -> None: ...

    return app


def test_a_handler_returning_a_model_has_a_reply_on_the_direct_reply_to_channel() -> None:
    document = build(make_app(), TOPOLOGY)
    check_document(document)

    reply = document["operations"]["receive.pricing.quotes"]["reply"]
    assert reply["channel"] == {"$ref": "#/channels/reply"}
    assert reply["address"]["location"] == "$message.header#/reply_to"
    assert [m["$ref"] for m in reply["messages"]] == [
        "#/channels/reply/messages/Quote",
        "#/channels/reply/messages/rabbitflow.reply-error",
    ]
    channel = document["channels"]["reply"]
    assert channel["address"] == "amq.rabbitmq.reply-to"
    assert document["components"]["schemas"]["Quote"]["required"] == ["sku", "price"]
    error = document["components"]["messages"]["rabbitflow.reply-error"]
    assert set(error["headers"]["properties"]) == {
        "rabbitflow-error-type",
        "rabbitflow-error-message",
    }


def test_a_handler_returning_nothing_has_no_reply() -> None:
    document = build(make_app(), TOPOLOGY)
    assert "reply" not in document["operations"]["receive.pricing.events"]


def test_without_replying_handlers_there_is_no_reply_channel() -> None:
    app = App()

    @app.consumer("pricing.events")
    async def changed(req: QuoteRequest) -> None: ...

    @app.consumer("pricing.quotes")
    async def other(req: dict[str, str]) -> None: ...

    assert "reply" not in build(app, TOPOLOGY)["channels"]
