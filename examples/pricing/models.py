"""The messages of the pricing service: the caller's request and the service's reply."""

from __future__ import annotations

from pydantic import BaseModel, Field


class QuoteRequest(BaseModel):
    sku: str
    quantity: int = Field(default=1, ge=1)


class Quote(BaseModel):
    sku: str
    quantity: int
    unit_price: float
    total: float
