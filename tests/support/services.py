"""What some tests need besides RabbitMQ, and the skip when it is missing (a failure in CI).

Each service is found through one environment variable, so a run can point the tests at
another instance, or hide it behind a closed port as CI's bare-machine stage does
(``.ci/bare-machine.sh``, docs/development.md#services):

- Redis (idempotency store): ``RABBITFLOW_TEST_REDIS``, default ``redis://127.0.0.1:6379/0``;
- PostgreSQL (idempotency store): ``RABBITFLOW_TEST_POSTGRES``, default
  ``postgresql://postgres@127.0.0.1:5432/test``;
- the broker's management API (tests marked ``management``): ``RABBITFLOW_MANAGEMENT_URL``,
  default port 15672 of the test broker's host;
- Chromium (the console's browser tests): ``RABBITFLOW_TEST_CHROMIUM``, default
  ``/usr/bin/chromium``.

The check is the one a user's machine fails: nothing accepts a connection on the URL's
port, or the browser is not there. The reason names the service, where it was looked for,
and how to provide it. Each test keeps to its own key prefix or table and removes it
afterwards (``delete_prefix``, ``drop_table``).
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit

from rabbitflow.testing.pytest_plugin import LOCAL_URL, unavailable
from rabbitflow.topology._management import configured_url, with_credentials
from tests.support import network

REDIS_URL = os.environ.get("RABBITFLOW_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "RABBITFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
CHROMIUM = os.environ.get("RABBITFLOW_TEST_CHROMIUM", "/usr/bin/chromium")


def answers(url: str, default_port: int) -> bool:
    """Does something accept TCP connections on the host and port of ``url``?"""
    parts = urlsplit(url)
    return network.answers(parts.hostname or "127.0.0.1", parts.port or default_port)


def _where(url: str, default_port: int) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"


def _require(url: str, default_port: int, missing: str, how: str, needed_by: str) -> str:
    """``url`` once something answers on it; else skipped (failed in CI) saying ``missing``
    on which port, and ``how`` to provide it."""
    if not answers(url, default_port):
        unavailable(f"{missing} on {_where(url, default_port)} ({how})", needed_by=needed_by)
    return url


def require_redis() -> str:
    """``RABBITFLOW_TEST_REDIS``, once it answers."""
    return _require(
        REDIS_URL, 6379, "no Redis", "RABBITFLOW_TEST_REDIS; bash .ci/services/redis.sh starts one",
        "the idempotency store tests",
    )  # fmt: skip


def require_postgres() -> str:
    """``RABBITFLOW_TEST_POSTGRES``, once it answers."""
    return _require(
        POSTGRES_URL, 5432, "no PostgreSQL",
        "RABBITFLOW_TEST_POSTGRES; bash .ci/services/postgres.sh starts one",
        "the idempotency store tests",
    )  # fmt: skip


def broker_url() -> str:
    """The AMQP URL the broker tests use (the plugin's choice, but for Docker)."""
    return os.environ.get("RABBITFLOW_TEST_URL") or LOCAL_URL


def require_management() -> str:
    """The management API rabbitflow would use for the test broker, once it answers."""
    return _require(
        with_credentials(configured_url(), broker_url()), 15672,
        "RabbitMQ's management API does not answer",
        "RABBITFLOW_MANAGEMENT_URL; rabbitmq-plugins enable rabbitmq_management, as "
        ".ci/services/rabbitmq-management.sh does",
        "the tests marked management",
    )  # fmt: skip


def require_chromium() -> str:
    """``RABBITFLOW_TEST_CHROMIUM``, once it is an executable."""
    if not shutil.which(CHROMIUM):
        unavailable(
            f"{CHROMIUM} is missing (RABBITFLOW_TEST_CHROMIUM; bash .ci/services/chromium.sh "
            "installs Debian's chromium)",
            needed_by="the browser tests",
        )
    return CHROMIUM


# -- a test's own space in a shared store (teardown) ----------------------------------------


async def drop_table(url: str, table: str) -> None:
    """Drop a test's PostgreSQL table (teardown)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete a test's Redis keys (teardown)."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
