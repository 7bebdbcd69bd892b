"""pytest fixtures for testing rabbitflow apps (registered through the ``pytest11`` entry point).

* ``rabbitflow_app``: a factory ``await rabbitflow_app(app, topology=None, **options)`` that
  returns an entered :class:`~rabbitflow.testing.TestApp` on the in-memory broker, closed after
  the test.
* ``rabbitmq_url``: a real RabbitMQ: ``RABBITFLOW_TEST_URL``, else one listening on
  127.0.0.1:5672, else a testcontainers RabbitMQ when Docker answers; else the test is skipped,
  or fails when the ``CI`` environment variable is set.
* ``rabbitmq_vhost`` / ``rabbitmq_vhost_url``: a fresh virtual host for one test, created and
  deleted through the broker's management HTTP API when it answers
  (``RABBITFLOW_TEST_MANAGEMENT_URL``, else the AMQP port plus 10000: 15672), else with
  ``rabbitmqctl`` (the local one, the container's, or the command in ``RABBITFLOW_TEST_CTL``
  for the broker ``RABBITFLOW_TEST_URL`` names), which starts an Erlang VM per call.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from rabbitflow.testing._admin import (
    CTL_ENV,
    Admin,
    Ctl,
    ManagementAPI,
    local_ctl,
    management_for,
)

if TYPE_CHECKING:
    from rabbitflow.app import App
    from rabbitflow.testing._app import TestApp

F = TypeVar("F", bound=Callable[..., Any])

try:
    import pytest_asyncio

    _fixture: Any = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - the in-memory fixture then needs another async plugin
    _fixture = pytest.fixture


def _async_fixture(func: F) -> F:
    return cast(F, _fixture(func))


LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
CONTAINER_IMAGE = "rabbitmq:3.13-alpine"
__all__ = ["CTL_ENV", "Admin", "Ctl", "ManagementAPI", "RabbitMQ"]

AppFactory = Callable[..., Awaitable["TestApp"]]


@dataclass(frozen=True)
class RabbitMQ:
    """A real broker for tests: its URL and, when available, a way to run ``rabbitmqctl`` and
    its management API."""

    url: str
    ctl: Ctl | None = None
    management: ManagementAPI | None = None

    @property
    def admin(self) -> Admin:
        """Vhosts, users and permissions: through ``management`` when set, else ``ctl``."""
        return Admin(self.management, self.ctl)

    def vhost_url(self, vhost: str) -> str:
        """``url`` with its virtual host replaced by ``vhost``."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.url).username or "guest")

    @contextlib.contextmanager
    def vhost(self, prefix: str = "rabbitflow-test") -> Iterator[str]:
        """A new virtual host, usable by the URL's user, deleted afterwards."""
        if not self.admin.available:
            unavailable(
                f"cannot create a vhost on {self.url.split('@')[-1]}: neither its management "
                "API nor rabbitmqctl answers (install rabbitmqctl next to the broker, or use "
                "rabbitmq_url with its own vhost)"
            )
            raise AssertionError("unreachable")  # pragma: no cover
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        try:
            self.admin.add_vhost(name)
        except RuntimeError as exc:
            if self.admin.api is not None:
                raise  # the API answered and refused: not a missing service
            # Debian's rabbitmqctl runs only as root or rabbitmq (the Erlang cookie).
            unavailable(
                f"cannot create a vhost on {self.url.split('@')[-1]}: the management API "
                f"does not answer and rabbitmqctl failed ({exc}); enable the management "
                "plugin (rabbitmq-plugins enable rabbitmq_management) or run rabbitmqctl as "
                "a user it accepts"
            )
        try:
            self.admin.set_permissions(name, self.user)
            yield name
        finally:
            with contextlib.suppress(Exception):
                self.admin.delete_vhost(name)


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Is the ``CI`` environment variable set (to anything but empty, 0 or false)?"""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str, *, needed_by: str = "the broker tests") -> None:
    """Skip the test, or fail it in CI, where ``needed_by`` (the tests that need what is
    missing) must run. ``reason`` names what is missing and how to provide it."""
    if in_ci():
        pytest.fail(f"{reason}; CI must run {needed_by}", pytrace=False)
    pytest.skip(reason)


def choose_source(
    environ: Mapping[str, str],
    local_answers: Callable[[], bool],
    docker_answers: Callable[[], bool],
) -> str | None:
    """Where the real broker comes from: ``env``, ``local``, ``docker``, or None."""
    if environ.get("RABBITFLOW_TEST_URL"):
        return "env"
    if local_answers():
        return "local"
    if docker_answers():
        return "docker"
    return None


def _local_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def connect(url: str, ctl: Ctl | None) -> RabbitMQ:
    """The broker at ``url``: administered through its management API when it answers."""
    return RabbitMQ(url, ctl, management_for(url))


@contextlib.contextmanager
def _container() -> Iterator[RabbitMQ]:
    from testcontainers.community.rabbitmq import RabbitMqContainer

    with RabbitMqContainer(CONTAINER_IMAGE) as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        url = f"amqp://{container.username}:{container.password}@{host}:{port}/"

        def ctl(args: list[str]) -> str:
            result = container.exec(["rabbitmqctl", *args])
            output = result.output.decode(errors="replace")
            if result.exit_code != 0:
                raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {output.strip()}")
            return output

        yield RabbitMQ(url, ctl)


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[RabbitMQ]:
    """The real broker of this test session (see the module docstring for where it comes from)."""
    source = choose_source(os.environ, _local_answers, _docker_answers)
    if source == "env":
        yield connect(os.environ["RABBITFLOW_TEST_URL"], local_ctl())
    elif source == "local":
        yield connect(LOCAL_URL, local_ctl())
    elif source == "docker":
        with _container() as broker:
            yield broker
    else:
        unavailable(
            "no RabbitMQ: RABBITFLOW_TEST_URL is not set, nothing listens on 127.0.0.1:5672 "
            "and Docker is not available"
        )


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_broker: RabbitMQ) -> str:
    """AMQP URL of a real RabbitMQ (its default vhost)."""
    return rabbitmq_broker.url


@pytest.fixture
def rabbitmq_vhost(rabbitmq_broker: RabbitMQ) -> Iterator[str]:
    """A fresh virtual host for one test, deleted afterwards."""
    with rabbitmq_broker.vhost() as name:
        yield name


@pytest.fixture
def rabbitmq_vhost_url(rabbitmq_broker: RabbitMQ, rabbitmq_vhost: str) -> str:
    """AMQP URL of the test's own virtual host."""
    return rabbitmq_broker.vhost_url(rabbitmq_vhost)


@_async_fixture
async def rabbitflow_app() -> AsyncIterator[AppFactory]:
    """``await rabbitflow_app(app, topology=None, **options)``: an entered in-memory TestApp."""
    from rabbitflow.testing._app import TestApp  # imported late: the plugin loads in every session

    async with contextlib.AsyncExitStack() as stack:

        async def start(app: App, topology: Any = None, **options: Any) -> TestApp:
            return await stack.enter_async_context(TestApp(app, topology, **options))

        yield start
