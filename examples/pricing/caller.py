"""A caller of the pricing service: ``python -m examples.pricing.caller A1 B2 --quantity 3``.

Sends every quote request at once (they are in flight together on one connection) and
prints each reply, or the service's error.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from examples.pricing.models import Quote, QuoteRequest
from rabbitflow import App, RemoteError, RequestTimeout

# The broker: RABBITFLOW_URL, else the topology file's [broker].url, else 127.0.0.1:5672.
app = App(topology=Path(__file__).with_name("topology.toml"), name="pricing-caller")


async def quote(sku: str, quantity: int) -> str:
    try:
        answer = await app.request(
            "rpc",
            "price.quote",
            QuoteRequest(sku=sku, quantity=quantity),
            timeout=5.0,
            response_model=Quote,
        )
    except RemoteError as exc:  # the service failed for good (here: unknown sku)
        return f"{sku}: refused ({exc.message})"
    except RequestTimeout as exc:  # sent: the service may have run it, but will not any more
        sent = "sent" if exc.sent else "not sent"
        return f"{sku}: no answer within 5s, request {sent} (is the service running?)"
    return f"{sku}: {answer.quantity} x {answer.unit_price} = {answer.total}"


async def main(skus: list[str], quantity: int) -> list[str]:
    async with app:
        return list(await asyncio.gather(*(quote(sku, quantity) for sku in skus)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Ask the pricing service for quotes.")
    parser.add_argument("skus", nargs="+")
    parser.add_argument("--quantity", type=int, default=1)
    args = parser.parse_args()
    for line in asyncio.run(main(args.skus, args.quantity)):
        print(line)
