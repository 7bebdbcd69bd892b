"""Request / reply end to end: a handler's return value is the reply (contract section 7).

On the in-memory broker through ``TestApp`` (the real dispatcher, settler and publisher),
and once against the real RabbitMQ under the worker.
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from rabbitflow import App, Message, Reject, RemoteError, RequestTimeout
from rabbitflow.testing import TestApp
from rabbitflow.topology import parse_topology
from tests.support.processes import ROOT, Workers

TOPOLOGY = parse_topology(
    """
[exchanges.rpc]
type = "direct"

[queues."pricing.quotes"]
bindings = [{ exchange = "rpc", routing_key = "price.quote" }]
retry = { delays = ["1s"], max_attempts = 2 }

[queues."pricing.events"]
bindings = [{ exchange = "rpc", routing_key = "price.changed" }]
"""
)


class QuoteRequest(BaseModel):
    sku: str


class Quote(BaseModel):
    sku: str
    price: float


def pricing_app() -> App:
    app = App()

    @app.consumer("pricing.quotes")
    async def price(req: QuoteRequest) -> Quote:
        if req.sku == "gone":
            raise Reject("sku withdrawn")
        if req.sku == "broken":
            raise LookupError("price table unavailable")
        return Quote(sku=req.sku, price=9.5)

    @app.consumer("pricing.events")
    async def changed(req: QuoteRequest, message: Message) -> dict[str, str]:
        return {"seen": req.sku}

    return app


async def test_the_handlers_return_value_is_the_reply() -> None:
    app = pricing_app()
    async with TestApp(app, TOPOLOGY):
        quote = await app.request(
            "rpc", "price.quote", QuoteRequest(sku="A1"), timeout=5, response_model=Quote
        )
        assert quote == Quote(sku="A1", price=9.5)


async def test_many_requests_in_flight_are_matched_to_their_replies() -> None:
    app = pricing_app()
    async with TestApp(app, TOPOLOGY):
        quotes = await asyncio.gather(
            *(app.request("rpc", "price.quote", {"sku": f"S{n}"}, timeout=5) for n in range(50))
        )
        assert [q["sku"] for q in quotes] == [f"S{n}" for n in range(50)]
        assert app.requests_in_flight == 0


async def test_a_handler_that_fails_for_good_replies_a_remote_error_and_dead_letters() -> None:
    app = pricing_app()
    async with TestApp(app, TOPOLOGY) as t:
        with pytest.raises(RemoteError) as caught:
            await app.request("rpc", "price.quote", {"sku": "gone"}, timeout=5)
        assert caught.value.type == "rabbitflow.errors.Reject"
        assert caught.value.message == "sku withdrawn"
        await t.drain()
        assert len(t.dead_letters("pricing.quotes")) == 1


async def test_a_retried_request_replies_only_once_its_retries_are_spent() -> None:
    app = pricing_app()
    async with TestApp(app, TOPOLOGY) as t:
        call = asyncio.ensure_future(
            app.request("rpc", "price.quote", {"sku": "broken"}, timeout=5)
        )
        await t.drain()  # attempt 1 fails, the 1s tier passes on the virtual clock, attempt 2
        with pytest.raises(RemoteError, match="LookupError: price table unavailable"):
            await call
        assert [h.attempt for h in t.handled("pricing.quotes")] == [1, 2]


async def test_an_undecodable_request_is_answered_with_the_decode_error() -> None:
    app = pricing_app()
    async with TestApp(app, TOPOLOGY):
        with pytest.raises(RemoteError) as caught:
            await app.request("rpc", "price.quote", {"no": "sku"}, timeout=5)
        assert caught.value.type == "rabbitflow.errors.DecodeError"
        assert "sku" in caught.value.message


async def test_a_return_value_without_reply_to_publishes_nothing() -> None:
    app = pricing_app()
    async with TestApp(app, TOPOLOGY) as t:
        await t.publish("rpc", "price.changed", {"sku": "A1"})
        await t.drain()
        assert [h.payload.sku for h in t.handled("pricing.events")] == ["A1"]
        assert t.broker.reply_channels == {}
        assert all(len(q) == 0 for q in t.broker.queues.values())


async def test_no_handler_means_a_request_timeout() -> None:
    app = App()

    @app.consumer("pricing.events")
    async def changed(req: QuoteRequest) -> None: ...

    topology = parse_topology(
        """
[exchanges.rpc]
type = "direct"
[queues."pricing.quotes"]
bindings = [{ exchange = "rpc", routing_key = "price.quote" }]
[queues."pricing.events"]
bindings = [{ exchange = "rpc", routing_key = "price.changed" }]
"""
    )
    async with TestApp(app, topology):
        with pytest.raises(RequestTimeout, match=r"within 0.2s"):
            await app.request("rpc", "price.quote", {"sku": "A1"}, timeout=0.2)


# -- the pricing example -----------------------------------------------------------------------


async def test_the_pricing_example_answers_quotes_and_refuses_an_unknown_sku() -> None:
    from examples.pricing import caller, service

    async with TestApp(service.app):
        caller.app.attach(service.app._publisher)  # the caller talks to the in-memory broker
        try:
            lines = await asyncio.gather(
                caller.quote("A1", 3), caller.quote("B2", 3), caller.quote("Z9", 3)
            )
        finally:
            caller.app.attach(None)
    assert lines == [
        "A1: 3 x 9.5 = 28.5",
        "B2: 3 x 120.0 = 360.0",
        "Z9: refused (unknown sku 'Z9')",
    ]


@pytest.mark.broker
def test_the_pricing_example_under_rabbitflow_run(workers: Workers, vhost_url: str) -> None:
    from examples.pricing import caller

    topology = ROOT / "examples" / "pricing" / "topology.toml"
    service = workers.start("examples.pricing.service:app", topology, ready_timeout=30)
    try:
        caller.app.url = vhost_url
        lines = asyncio.run(caller.main(["A1", "Z9"] + ["B2"] * 48, 2))
        assert lines[:2] == ["A1: 2 x 9.5 = 19.0", "Z9: refused (unknown sku 'Z9')"]
        assert lines[2:] == ["B2: 2 x 120.0 = 240.0"] * 48
        assert service.has_event("message dead-lettered")  # the refused request, in the DLQ
    finally:
        caller.app.url = None


async def test_a_sync_handler_replies_and_a_handler_may_call_another_service() -> None:
    app = App()

    @app.consumer("pricing.quotes")
    def price(req: QuoteRequest) -> Quote:  # sync: runs in the executor, replies all the same
        return Quote(sku=req.sku, price=2.0)

    @app.consumer("pricing.events")
    async def changed(req: QuoteRequest) -> dict[str, float]:
        # A request from inside a handler goes out on the worker's own connection.
        quote = await app.request("rpc", "price.quote", req, timeout=5, response_model=Quote)
        return {"doubled": quote.price * 2}

    async with TestApp(app, TOPOLOGY):
        reply = await app.request("rpc", "price.changed", {"sku": "A1"}, timeout=5)
        assert reply == {"doubled": 4.0}
