from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rabbit import Rabbit, require_rabbit


@pytest.fixture(scope="session")
def rabbit() -> Rabbit:
    """The real broker; skipped without one, a failure in CI."""
    return require_rabbit()


@pytest.fixture
def vhost(rabbit: Rabbit) -> Iterator[str]:
    """A fresh vhost for one test, deleted afterwards."""
    with rabbit.vhost() as name:
        yield name


@pytest.fixture
def vhost_url(rabbit: Rabbit, vhost: str) -> str:
    """AMQP URL of the test's own vhost."""
    return rabbit.vhost_url(vhost)
