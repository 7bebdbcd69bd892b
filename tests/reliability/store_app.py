"""The reliability worker with an idempotent consumer: ``tests.reliability.store_app:app``.

The same handler and records as :mod:`tests.reliability.app`, with ``idempotent=True`` and
the store the test names:

- ``RF_REL_STORE``: ``redis://...`` (a ``RedisStore``) or ``postgresql://...`` (a
  ``PostgresStore``), required;
- ``RF_REL_STORE_SPACE``: the Redis key prefix or the PostgreSQL table of this test.
"""

from __future__ import annotations

import os

from rabbitflow import App, Message
from rabbitflow.idempotency import IdempotencyStore, PostgresStore, RedisStore
from tests.reliability.app import QUEUE, Job, handle
from tests.reliability.stores import SPACE_ENV, STORE_ENV


def _store() -> IdempotencyStore:
    url = os.environ[STORE_ENV]
    space = os.environ[SPACE_ENV]
    if url.startswith("redis"):
        return RedisStore(url, prefix=space)
    return PostgresStore(url, table=space)


app = App(name="rf-reliability", idempotency=_store())


@app.consumer(QUEUE, idempotent=True)
async def handle_once(job: Job, message: Message) -> None:
    await handle(job, message)
