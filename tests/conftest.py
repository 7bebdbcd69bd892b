from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rabbitflow.testing.pytest_plugin import CONTAINER_IMAGE
from rabbitflow.testing.pytest_plugin import _docker_answers as docker_answers
from tests.rabbit import Rabbit, find_rabbit, require_rabbit


@pytest.fixture(scope="session")
def rabbit() -> Iterator[Rabbit]:
    """The real broker: ``RABBITFLOW_TEST_URL``, else RabbitMQ on 127.0.0.1:5672, else a
    testcontainers RabbitMQ where Docker runs (a laptop); skipped without any, failed in CI."""
    found = find_rabbit()
    if found is not None:
        yield found
        return
    if docker_answers():
        with rabbit_container() as container:
            yield container
        return
    yield require_rabbit()


@contextmanager
def rabbit_container() -> Iterator[Rabbit]:
    """A RabbitMQ container for the session; ``rabbitmqctl`` runs inside it."""
    from testcontainers.community.rabbitmq import RabbitMqContainer

    with RabbitMqContainer(CONTAINER_IMAGE) as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        url = f"amqp://{container.username}:{container.password}@{host}:{port}/"
        container_id = container.get_wrapped_container().id
        yield Rabbit(url, ["docker", "exec", container_id, "rabbitmqctl"])


@pytest.fixture
def vhost(rabbit: Rabbit) -> Iterator[str]:
    """A fresh vhost for one test, deleted afterwards."""
    with rabbit.vhost() as name:
        yield name


@pytest.fixture
def vhost_url(rabbit: Rabbit, vhost: str) -> str:
    """AMQP URL of the test's own vhost."""
    return rabbit.vhost_url(vhost)
