"""Send SMS through a rate-limited provider; a 429 becomes ``Retry.after(its Retry-After)``.

Run it from the repository root::

    rabbitflow topology declare examples/rate_limited/topology.toml
    rabbitflow run examples.rate_limited.app:app
    rabbitflow publish notifications sms '{"to": "+15550100", "text": "hi"}'
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import structlog
from pydantic import BaseModel

from examples.rate_limited.gateway import SmsGateway
from rabbitflow import App, Message, Reject, Retry

log = structlog.get_logger("sms")

# The stub provider. In production the client talks to the real API: drop the transport and
# set the provider's base_url and credentials.
gateway = SmsGateway(limit=2, window=10.0)
sms_api: httpx.AsyncClient  # opened for the lifetime of the worker, by lifespan()

# A Retry-After we cannot read still means "slow down": wait this long.
DEFAULT_WAIT = 10.0


@contextlib.asynccontextmanager
async def lifespan(app: App) -> AsyncIterator[None]:
    global sms_api
    transport = httpx.MockTransport(gateway)
    async with httpx.AsyncClient(base_url="https://sms.example", transport=transport) as client:
        sms_api = client
        yield


app = App(topology=Path(__file__).with_name("topology.toml"), lifespan=lifespan, name="sms-sender")


class Sms(BaseModel):
    to: str
    text: str


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), as
    ``Retry.after`` reads it; ``DEFAULT_WAIT`` when it cannot be read."""
    return (Retry.after(value, default=DEFAULT_WAIT, now=now).delay_ms or 0) / 1000


@app.consumer("notifications.sms")
async def send_sms(sms: Sms, message: Message) -> None:
    response = await sms_api.post(
        "/messages",
        json=sms.model_dump(),
        # The provider drops a repeated key, so a redelivered message is not sent twice.
        headers={"Idempotency-Key": message.message_id or ""},
    )
    if response.status_code == 429:
        # Retry-After is in seconds (or an HTTP date): Retry.after reads it; Retry(120) would
        # mean 120 ms. No earlier than the provider asked: the message waits in a retry tier
        # (in the broker, not in this process) and comes back as the next attempt.
        header = response.headers.get("Retry-After")
        retry = Retry.after(
            header, default=DEFAULT_WAIT, reason=f"rate limited; Retry-After {header}"
        )
        log.info("rate limited", to=sms.to, wait_ms=retry.delay_ms, attempt=message.attempt)
        raise retry
    if response.status_code in (400, 422):
        raise Reject(f"the provider refused the message: {response.text}")
    response.raise_for_status()  # a 5xx is retried through the normal tiers
    log.info("sms sent", to=sms.to, attempt=message.attempt)
