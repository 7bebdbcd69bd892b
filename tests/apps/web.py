"""A web app served by uvicorn in the tests of ``rabbitflow.asgi`` (tests/test_asgi.py).

``api`` is FastAPI, ``starlette_app`` Starlette, with one lifespan object.
``$RF_CONSUME`` (``1``/``0``) chooses ``lifespan(app, consume=...)``. The consumer of ``work``
records ``start <message_id>`` and, after sleeping ``$RF_SLEEP`` seconds,
``done <message_id> <redelivered>`` (tests/apps/recording.py). ``POST /work`` publishes one
message and answers its id, ``POST /jobs`` enqueues one as a job (the job statuses are in
memory: the web process consumes them itself), ``GET /jobs/{id}`` is ``jobs_router``;
``/readyz`` is the consumers' health.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rabbitflow import App, Message
from rabbitflow.asgi import ConsumerHealth, jobs_router, lifespan
from rabbitflow.idempotency import MemoryStore
from tests.apps.recording import record

app = App(topology=Path(__file__).with_name("work.toml"), name="web", jobs=MemoryStore())


@app.consumer("work", track=True)
async def handle_work(message: Message) -> dict[str, object]:
    record("start", message.message_id)
    await asyncio.sleep(float(os.environ.get("RF_SLEEP", "0")))
    record("done", message.message_id, message.redelivered)
    return {"handled": message.message_id}


consumers = lifespan(
    app,
    consume=os.environ.get("RF_CONSUME") == "1",
    shutdown_timeout=10.0,
    ready_timeout=3.0,
    reconnect_max_wait=1.0,
)
api = FastAPI(lifespan=consumers)
api.add_route("/readyz", consumers.readyz)
api.include_router(jobs_router(app), prefix="/jobs")


@api.post("/work")
async def publish_work() -> dict[str, str]:
    return {"message_id": await app.publish("jobs", "work", {"n": 1})}


@api.post("/jobs", status_code=202)
async def enqueue_work() -> dict[str, str]:
    job = await app.enqueue("jobs", "work", {"n": 1})
    return {"id": job.id}


@api.get("/consumers")
async def consumer_health(
    health: ConsumerHealth = Depends(consumers.health),  # noqa: B008  # FastAPI's way
) -> dict[str, object]:
    return health.as_dict()


async def publish_work_starlette(request: Request) -> JSONResponse:
    return JSONResponse(await publish_work())


# The same lifespan object in a Starlette app.
starlette_app = Starlette(
    lifespan=consumers,
    routes=[
        Route("/readyz", consumers.readyz),
        Route("/work", publish_work_starlette, methods=["POST"]),
    ],
)
