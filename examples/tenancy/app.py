"""Invoices sent per tenant: a middleware for the tenant, ``app.state`` for a resource.

Run it from the repository root with ``rabbitflow run examples.tenancy.app:app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydantic import BaseModel

from examples.tenancy.middleware import TENANT, TenantMiddleware
from rabbitflow import App

log = structlog.get_logger("invoices")


@dataclass
class Mailer:
    """Stands for a resource made once at start-up (an HTTP client, a connection pool)."""

    sender: str
    sent: list[tuple[str, str]] = field(default_factory=list)

    async def send(self, to: str, subject: str) -> None:
        self.sent.append((TENANT.get(), f"{to}: {subject}"))

    async def close(self) -> None:
        return None


@asynccontextmanager
async def lifespan(app: App) -> AsyncIterator[None]:
    # Made before the first message, closed after the last: handlers find it on app.state.
    app.state.mailer = Mailer(sender="billing@example.com")
    try:
        yield
    finally:
        await app.state.mailer.close()


app = App(topology=Path(__file__).with_name("topology.toml"), lifespan=lifespan, name="invoices")
app.add_middleware(TenantMiddleware(header="tenant"))


class InvoiceReady(BaseModel):
    invoice_id: str
    email: str


@app.consumer("invoices.send")
async def send_invoice(invoice: InvoiceReady) -> None:
    mailer: Mailer = app.state.mailer
    await mailer.send(invoice.email, f"invoice {invoice.invoice_id}")
    log.info("invoice sent", invoice_id=invoice.invoice_id)  # carries tenant=...
