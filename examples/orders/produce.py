"""Publish example orders: ``python -m examples.orders.produce [COUNT]``."""

from __future__ import annotations

import asyncio
import sys

from examples.orders.app import app
from examples.orders.models import OrderCreated


async def main(count: int) -> None:
    async with app:
        await asyncio.gather(
            *(
                app.publish(
                    "orders",
                    "order.created",
                    OrderCreated(order_id=i, customer=f"customer-{i % 7}", amount=10.0 + i),
                    headers={"customer-tier": "vip" if i % 10 == 0 else "standard"},
                )
                for i in range(1, count + 1)
            )
        )
    print(f"published {count} orders")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
