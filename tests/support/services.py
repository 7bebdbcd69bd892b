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
and how to provide it.
"""

from __future__ import annotations

import os
import shutil
import socket
from urllib.parse import urlsplit

from rabbitflow.testing.pytest_plugin import LOCAL_URL, unavailable
from rabbitflow.topology._management import configured_url, with_credentials

REDIS_URL = os.environ.get("RABBITFLOW_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "RABBITFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
CHROMIUM = os.environ.get("RABBITFLOW_TEST_CHROMIUM", "/usr/bin/chromium")


def answers(url: str, default_port: int) -> bool:
    """Does something accept TCP connections on the host and port of ``url``?"""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1
        ):
            return True
    except OSError:
        return False


def _where(url: str, default_port: int) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"


def require_redis() -> str:
    """``RABBITFLOW_TEST_REDIS``, once it answers."""
    if not answers(REDIS_URL, 6379):
        unavailable(
            f"no Redis on {_where(REDIS_URL, 6379)} (RABBITFLOW_TEST_REDIS; "
            "bash .ci/services/redis.sh starts one)",
            needed_by="the idempotency store tests",
        )
    return REDIS_URL


def require_postgres() -> str:
    """``RABBITFLOW_TEST_POSTGRES``, once it answers."""
    if not answers(POSTGRES_URL, 5432):
        unavailable(
            f"no PostgreSQL on {_where(POSTGRES_URL, 5432)} (RABBITFLOW_TEST_POSTGRES; "
            "bash .ci/services/postgres.sh starts one)",
            needed_by="the idempotency store tests",
        )
    return POSTGRES_URL


def broker_url() -> str:
    """The AMQP URL the broker tests use (the plugin's choice, but for Docker)."""
    return os.environ.get("RABBITFLOW_TEST_URL") or LOCAL_URL


def require_management() -> str:
    """The management API rabbitflow would use for the test broker, once it answers."""
    api = with_credentials(configured_url(), broker_url())
    if not answers(api, 15672):
        unavailable(
            f"RabbitMQ's management API does not answer on {_where(api, 15672)} "
            "(RABBITFLOW_MANAGEMENT_URL; rabbitmq-plugins enable rabbitmq_management, as "
            ".ci/services/rabbitmq-management.sh does)",
            needed_by="the tests marked management",
        )
    return api


def require_chromium() -> str:
    """``RABBITFLOW_TEST_CHROMIUM``, once it is an executable."""
    if not shutil.which(CHROMIUM):
        unavailable(
            f"{CHROMIUM} is missing (RABBITFLOW_TEST_CHROMIUM; bash .ci/services/chromium.sh "
            "installs Debian's chromium)",
            needed_by="the browser tests",
        )
    return CHROMIUM
