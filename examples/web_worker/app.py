"""A sign-up API that sends the welcome e-mail in the background, from the same process.

    uvicorn examples.web_worker.app:api

``POST /signups`` publishes ``signup.created`` and answers 202 at once; the consumer of
``signups.welcome`` runs in the web process (``lifespan(app, consume=True)``), with the
retries, dead letters, drain on SIGTERM and reconnection of ``rabbitflow run``. ``/readyz``
answers 200 while the consumer consumes, 503 otherwise.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, Field

from rabbitflow import App, Message, PublishError
from rabbitflow.asgi import lifespan

app = App(topology=Path(__file__).with_name("topology.toml"), name="signups")


class Signup(BaseModel):
    """``POST /signups``, and the ``signup.created`` message."""

    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    name: str


class Mailer:
    """Stands in for the e-mail provider: remembers what this process sent."""

    def __init__(self) -> None:
        self.sent: dict[str, str] = {}  # signup id -> address

    async def send_welcome(self, signup_id: str, signup: Signup) -> None:
        self.sent[signup_id] = signup.email


mailer = Mailer()


@app.consumer("signups.welcome")
async def send_welcome(signup: Signup, message: Message) -> None:
    """Raising retries it (2 s, 30 s), then dead-letters it: the tiers are in topology.toml."""
    assert message.message_id is not None
    await mailer.send_welcome(message.message_id, signup)


consumers = lifespan(app, consume=True)
api = FastAPI(title="Sign-ups", lifespan=consumers)
api.add_route("/readyz", consumers.readyz)


@api.post("/signups", status_code=202)
async def create_signup(signup: Signup, response: Response) -> dict[str, str]:
    signup_id = uuid.uuid4().hex
    try:
        # Returns once the broker confirmed the message: the e-mail will be sent.
        await app.publish("signups", "signup.created", signup, message_id=signup_id)
    except PublishError:
        # Broker down or unreachable, refused, nacked, nothing bound: nothing was queued.
        raise HTTPException(503, "try again", headers={"Retry-After": "5"}) from None
    return {"id": signup_id}


@api.get("/stats")
async def stats() -> dict[str, int]:
    """What this process sent (each uvicorn worker process consumes its share)."""
    return {"welcomes_sent": len(mailer.sent)}
