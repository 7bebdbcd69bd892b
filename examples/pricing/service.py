"""The pricing service: answers ``price.quote`` requests with a :class:`Quote`.

Run it from the repository root with ``rabbitflow run examples.pricing.service:app``.
"""

from __future__ import annotations

from pathlib import Path

from examples.pricing.models import Quote, QuoteRequest
from rabbitflow import App, Reject

app = App(topology=Path(__file__).with_name("topology.toml"), name="pricing")

PRICES = {"A1": 9.5, "B2": 120.0, "C3": 0.25}


@app.consumer("pricing.quotes")
async def quote(request: QuoteRequest) -> Quote:
    """The return value is the reply: the request came with ``reply_to``."""
    unit_price = PRICES.get(request.sku)
    if unit_price is None:
        # Final: dead-lettered, and the caller gets RemoteError("rabbitflow.errors.Reject", ...).
        raise Reject(f"unknown sku {request.sku!r}")
    total = round(unit_price * request.quantity, 2)
    return Quote(sku=request.sku, quantity=request.quantity, unit_price=unit_price, total=total)
