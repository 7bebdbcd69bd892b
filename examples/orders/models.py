"""The events of the orders domain, shared by the consumers and the producer."""

from __future__ import annotations

from pydantic import BaseModel, Field


class OrderCreated(BaseModel):
    order_id: int
    customer: str
    amount: float = Field(gt=0)


class OrderPaid(BaseModel):
    order_id: int
    amount: float
