"""Middleware and ``app.state`` through the real dispatcher, on ``TestApp``; the tenancy example."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from examples.tenancy import app as tenancy
from rabbitflow import App, Message
from rabbitflow.middleware import CallNext
from rabbitflow.testing import TestApp
from rabbitflow.topology import parse_topology

TOPOLOGY = parse_topology(
    """
[exchanges.rpc]
type = "direct"

[queues.work]
bindings = [{ exchange = "rpc", routing_key = "work" }]
retry = { delays = ["1s"], max_attempts = 2 }
"""
)


async def test_middleware_wraps_every_run_and_can_change_the_reply() -> None:
    app = App()
    seen: list[tuple[str | None, int]] = []

    async def audit(message: Message, call_next: CallNext) -> Any:
        seen.append((message.message_id, message.attempt))
        result = await call_next(message)
        return {"wrapped": result}

    app.add_middleware(audit)

    @app.consumer("work")
    async def work(payload: dict[str, int]) -> int:
        if payload["n"] == 0:
            raise ConnectionError("flaky")
        return payload["n"] * 2

    async with TestApp(app, TOPOLOGY) as t:
        assert await app.request("rpc", "work", {"n": 21}, timeout=5) == {"wrapped": 42}
        await t.publish("rpc", "work", {"n": 0}, message_id="m-0")
        await t.drain()

    assert [attempt for message_id, attempt in seen if message_id == "m-0"] == [1, 2]


async def test_a_middleware_that_raises_fails_the_message_like_its_handler() -> None:
    app = App()
    ran: list[int] = []

    @app.use
    async def refuse_odd(message: Message, call_next: CallNext) -> Any:
        if message.headers.get("odd"):
            raise PermissionError("odd messages are not allowed")
        return await call_next(message)

    @app.consumer("work")
    async def work(payload: dict[str, int]) -> None:
        ran.append(payload["n"])

    async with TestApp(app, TOPOLOGY) as t:
        await t.publish("rpc", "work", {"n": 1}, headers={"odd": "yes"})
        await t.publish("rpc", "work", {"n": 2})
        await t.drain()
        [dead] = t.dead_letters("work")
        assert dead.headers["rabbitflow-error-type"] == "PermissionError"
        assert dead.headers["rabbitflow-attempt"] == 2

    assert ran == [2]


async def test_the_tenancy_example_sets_the_tenant_for_the_handler_and_its_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    contexts: list[dict[str, Any]] = []
    original = tenancy.Mailer.send

    async def spy(self: tenancy.Mailer, to: str, subject: str) -> None:
        contexts.append(structlog.contextvars.get_contextvars())
        await original(self, to, subject)

    monkeypatch.setattr(tenancy.Mailer, "send", spy)
    async with TestApp(tenancy.app) as t:
        invoice = {"invoice_id": "F-1", "email": "a@acme.test"}
        await t.publish("invoices", "invoice.ready", invoice, headers={"tenant": "acme"})
        await t.publish("invoices", "invoice.ready", invoice, headers={"tenant": "globex"})
        await t.publish("invoices", "invoice.ready", invoice)  # no tenant
        await t.drain()

        mailer = tenancy.app.state.mailer
        assert [tenant for tenant, _ in mailer.sent] == ["acme", "globex"]
        assert [c.get("tenant") for c in contexts] == ["acme", "globex"]
        [refused] = t.dead_letters("invoices.send")
        assert refused.headers["rabbitflow-error-type"] == "rabbitflow.errors.Reject"
    # Nothing leaks out of the handler's context.
    assert "tenant" not in structlog.contextvars.get_contextvars()
