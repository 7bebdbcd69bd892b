"""The plugin's vhosts on a real broker: through the management API when it answers, with
``rabbitmqctl`` when it does not, and the same vhost either way."""

from __future__ import annotations

import aio_pika
import pytest

from rabbitflow.testing._admin import ManagementAPI, local_ctl, management_for
from rabbitflow.testing.pytest_plugin import RabbitMQ, unavailable
from tests.support.broker import Rabbit
from tests.support.network import free_port

LOCAL = "amqp://guest:guest@127.0.0.1:5672/"


def test_the_management_api_is_off_when_its_variable_is_empty() -> None:
    assert management_for(LOCAL, {"RABBITFLOW_TEST_MANAGEMENT_URL": ""}) is None


def test_no_management_api_where_nothing_listens() -> None:
    explicit = {"RABBITFLOW_TEST_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}/"}
    assert management_for(LOCAL, explicit) is None


async def _can_declare(url: str) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("rf-admin-probe", auto_delete=True)
    return True


def _vhosts(api: ManagementAPI) -> set[str]:
    return {entry["name"] for entry in api.request("GET", "vhosts")}


@pytest.mark.broker
@pytest.mark.management
async def test_a_vhost_made_through_the_management_api_is_usable_and_gone_afterwards(
    rabbit: Rabbit,
) -> None:
    api = management_for(rabbit.url)
    if api is None:
        unavailable(
            "the management API does not answer next to the test broker "
            "(RABBITFLOW_TEST_MANAGEMENT_URL, else its AMQP port plus 10000)",
            needed_by="the tests marked management",
        )
        return
    broker = RabbitMQ(rabbit.url, None, api)  # no rabbitmqctl: the API alone
    with broker.vhost("rf-admin") as name:
        assert name in _vhosts(api)
        assert await _can_declare(broker.vhost_url(name))
    assert name not in _vhosts(api)


@pytest.mark.broker
async def test_without_the_management_api_rabbitmqctl_makes_the_vhost(rabbit: Rabbit) -> None:
    ctl = local_ctl()
    if ctl is None:
        unavailable("no rabbitmqctl for the test broker")
        return
    broker = RabbitMQ(rabbit.url, ctl)  # management None: the fallback
    with broker.vhost("rf-admin-ctl") as name:
        assert name in ctl(["list_vhosts", "--quiet", "--no-table-headers"]).split()
        assert await _can_declare(broker.vhost_url(name))
    assert name not in ctl(["list_vhosts", "--quiet", "--no-table-headers"]).split()
