"""The real broker of a test: the shipped plugin's :class:`RabbitMQ` with ``rabbitmqctl``
for what the management API cannot do (message counts as they are, closing connections,
memory alarms), its version, and the broker's view of queues and connections."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from rabbitflow._broker_version import BrokerVersion
from rabbitflow.testing._admin import Admin, ctl_command
from rabbitflow.testing.pytest_plugin import RabbitMQ
from tests.support.waiting import wait_until

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class Rabbit:
    """A broker for tests: the plugin's :class:`RabbitMQ` (URL, admin through the management
    API or ``rabbitmqctl``) and ``rabbitmqctl`` with the project's check/columns conveniences."""

    broker: RabbitMQ

    @classmethod
    def at(cls, url: str, ctl_prefix: list[str]) -> Rabbit:
        """A broker administered with ``ctl_prefix`` only (a node without the management API)."""
        return cls(RabbitMQ(url, ctl_command(ctl_prefix)))

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def admin(self) -> Admin:
        return self.broker.admin

    def ctl(self, *args: str, check: bool = True) -> str:
        """``rabbitmqctl ARGS``: its output; a failure raises unless ``check`` is false."""
        if self.broker.ctl is None:
            raise RuntimeError(f"rabbitmqctl {args[0]}: no rabbitmqctl for {self.url}")
        try:
            return self.broker.ctl(list(args))
        except RuntimeError:
            if check:
                raise
            return ""

    def vhost_url(self, vhost: str) -> str:
        return self.broker.vhost_url(vhost)

    @contextmanager
    def vhost(self, prefix: str = "rf-test") -> Iterator[str]:
        """A fresh vhost (the URL's user has every permission on it), deleted afterwards."""
        with self.broker.vhost(prefix) as name:
            yield name

    def forget_user(self, name: str) -> None:
        """Delete the user ``name`` if it is there (test teardown)."""
        with suppress(RuntimeError):
            self.admin.delete_user(name)

    def list(self, vhost: str, what: str, *columns: str) -> list[list[str]]:
        """Rows of ``rabbitmqctl list_<what>`` in ``vhost``, tab-separated columns.

        rabbitmqctl, not the management API: the API's message counts are those of the last
        statistics event (every 5 s), rabbitmqctl asks the queue processes."""
        out = self.ctl(f"list_{what}", "-p", vhost, "--no-table-headers", "--quiet", *columns)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def connections(self, *columns: str) -> builtins.list[builtins.list[str]]:
        """Rows of ``rabbitmqctl list_connections COLUMNS`` (every vhost)."""
        out = self.ctl("list_connections", "--no-table-headers", "--quiet", *columns)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def close_connections(self, vhost: str, name: str, timeout: float = 10.0) -> None:
        """Close the connections named ``name`` (the client's ``connection_name``) on ``vhost``
        through the management API, as an operator would; wait until one is listed (the API
        lists a connection a moment after it opens). Skipped without the API."""
        api = self.admin.api
        if api is None:
            pytest.skip("the management API of the test broker does not answer")

        def close() -> bool:
            closed = False
            for connection in api.request("GET", f"vhosts/{vhost}/connections") or []:
                if (connection.get("client_properties") or {}).get("connection_name") != name:
                    continue
                with suppress(RuntimeError):  # one closed before, still listed
                    api.request("DELETE", f"connections/{quote(connection['name'], safe='')}")
                    closed = True
            return closed

        wait_until(close, timeout, f"a connection {name!r} to be listed and closed", interval=0.2)


# -- the broker's view of a vhost ------------------------------------------------------------


def queue_counts(rabbit: Rabbit, vhost: str) -> dict[str, tuple[int, int, int]]:
    """``{queue: (messages, ready, unacknowledged)}`` as rabbitmqctl reports them."""
    rows = rabbit.list(
        vhost, "queues", "name", "messages", "messages_ready", "messages_unacknowledged"
    )
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in rows}


def queue_messages(rabbit: Rabbit, vhost: str) -> dict[str, int]:
    """``{queue: messages}`` (ready and unacknowledged) as rabbitmqctl reports them."""
    rows = rabbit.list(vhost, "queues", "name", "messages")
    return {name: int(messages) for name, messages in rows}


def queue_names(rabbit: Rabbit, vhost: str) -> list[str]:
    return [row[0] for row in rabbit.list(vhost, "queues", "name")]


def wait_queues_empty(rabbit: Rabbit, vhost: str, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until no queue of ``vhost`` holds a message (ready or unacked)."""

    def empty() -> dict[str, Any] | None:
        counts = queue_counts(rabbit, vhost)
        return counts if all(total == 0 for total, _, _ in counts.values()) else None

    return wait_until(empty, timeout, f"every queue of {vhost} to be empty", interval=0.3)


def worker_connections(rabbit: Rabbit, vhost: str) -> list[tuple[str, str]]:
    """``(pid, timeout)`` of the connections open on ``vhost``."""
    rows = rabbit.connections("pid", "vhost", "timeout")
    return [(row[0], row[2]) for row in rows if len(row) == 3 and row[1] == vhost]


# -- the broker's version ----------------------------------------------------------------------


def version_of(connection: AbstractConnection) -> BrokerVersion:
    """The version the broker announced when ``connection`` opened."""
    version = BrokerVersion.of(connection)
    assert version is not None, "the broker announced no version"
    return version


async def broker_version(url: str) -> BrokerVersion:
    """The version of the broker at ``url`` (what rabbitflow reads at connect)."""
    connection = await aio_pika.connect(url)
    try:
        return version_of(connection)
    finally:
        await connection.close()
