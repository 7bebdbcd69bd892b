"""The project's fixtures for the real broker, on the shipped plugin's ``rabbitmq_broker``
(``RABBITFLOW_TEST_URL``, else 127.0.0.1:5672, else a testcontainers RabbitMQ; skipped
without one, failed when ``CI`` is set). Helpers are in ``tests/support``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rabbitflow import App
from rabbitflow.testing.pytest_plugin import RabbitMQ
from tests.support.broker import Rabbit
from tests.support.processes import Workers
from tests.support.services import require_management


@pytest.fixture(scope="session")
def rabbit(rabbitmq_broker: RabbitMQ) -> Rabbit:
    """The real broker, with ``rabbitmqctl`` for what its management API cannot do."""
    return Rabbit(rabbitmq_broker)


@pytest.fixture
def vhost(rabbit: Rabbit) -> Iterator[str]:
    """A fresh vhost for one test (through the management API when it answers), deleted
    afterwards."""
    with rabbit.vhost() as name:
        yield name


@pytest.fixture
def vhost_url(rabbit: Rabbit, vhost: str) -> str:
    """AMQP URL of the test's own vhost."""
    return rabbit.vhost_url(vhost)


@pytest.fixture
async def caller(vhost_url: str) -> AsyncIterator[App]:
    """An app that only publishes and requests on the test's vhost (no topology), closed
    afterwards."""
    app = App(url=vhost_url, topology="missing.toml")
    try:
        yield app
    finally:
        await app.close()


@pytest.fixture
def workers(tmp_path: Path, vhost_url: str) -> Iterator[Workers]:
    """``rabbitflow run`` subprocesses on the test's vhost, killed if still running after it."""
    started = Workers(tmp_path, vhost_url)
    yield started
    started.cleanup()


# The chaos stage's fixtures: RabbitMQ nodes of their own that the tests stop, pause, alarm
# and kill (tests/reliability/chaos_node.py, tests/cluster).
CHAOS_FIXTURES = frozenset({"chaos_node", "cluster"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on a chaos node or the cluster is in the ``chaos`` stage, on those nodes."""
    for item in items:
        if CHAOS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.nodes)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures make a vhost
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``management`` is skipped (failed in CI) when the management API it
    would read does not answer: the marker is enough, no test has to remember a fixture."""
    if item.get_closest_marker("management") is not None:
        require_management()
