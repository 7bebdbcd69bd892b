"""Helpers for tests that need a real RabbitMQ: where it is, and isolated vhosts on it."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Rabbit:
    """A broker for tests: its base URL and a way to run ``rabbitmqctl`` against it."""

    url: str
    ctl_prefix: list[str]

    def ctl(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [*self.ctl_prefix, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def vhost_url(self, vhost: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))

    @contextmanager
    def vhost(self, prefix: str = "rf-test") -> Iterator[str]:
        """Create a fresh vhost (guest has every permission on it) and delete it afterwards."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.ctl("add_vhost", name)
        try:
            self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
            yield name
        finally:
            self.ctl("delete_vhost", name, check=False)

    def list(self, vhost: str, what: str, *columns: str) -> list[list[str]]:
        """Rows of ``rabbitmqctl list_<what>`` in ``vhost``, tab-separated columns."""
        out = self.ctl(f"list_{what}", "-p", vhost, "--no-table-headers", "--quiet", *columns)
        return [line.split("\t") for line in out.splitlines() if line.strip()]


def find_rabbit() -> Rabbit | None:
    """``RABBITFLOW_TEST_URL``, else a broker on 127.0.0.1:5672, else None.

    ``RABBITFLOW_TEST_CTL`` is the ``rabbitmqctl`` command for that broker (e.g.
    ``../shared/tools/rabbitmq4.sh ctl`` for the RabbitMQ 4.0 node); default ``rabbitmqctl``."""
    ctl = shutil.which("rabbitmqctl")
    url = os.environ.get("RABBITFLOW_TEST_URL")
    command = os.environ.get("RABBITFLOW_TEST_CTL")
    if url:
        return Rabbit(url, shlex.split(command) if command else [ctl] if ctl else [])
    if _answers("127.0.0.1", 5672) and ctl:
        return Rabbit(LOCAL_URL, [ctl])
    return None


def require_rabbit() -> Rabbit:
    rabbit = find_rabbit()
    if rabbit is None:
        message = "no RabbitMQ on 127.0.0.1:5672 and RABBITFLOW_TEST_URL is not set"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run broker tests", pytrace=False)
        pytest.skip(message)
    return rabbit
