"""What the API and the worker share: the topology file and where job statuses live.

Job statuses are in Redis (``$JOBS_REDIS_URL``, default ``redis://127.0.0.1:6379/0``), which
both processes reach from any host, under rabbitflow's keys (``rabbitflow:jobs:``, what
``rabbitflow dlq replay --jobs URL`` reads) unless ``$JOBS_PREFIX`` gives the store another
prefix. ``PostgresStore`` works the
same way; ``MemoryStore`` only when the API consumes in its own process.
"""

from __future__ import annotations

import os
from pathlib import Path

from rabbitflow.idempotency import RedisStore

TOPOLOGY = Path(__file__).with_name("topology.toml")


def job_store() -> RedisStore:
    """A store of the job statuses; each App gets its own client."""
    url = os.environ.get("JOBS_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = os.environ.get("JOBS_PREFIX")
    return RedisStore(url) if prefix is None else RedisStore(url, prefix=prefix)
