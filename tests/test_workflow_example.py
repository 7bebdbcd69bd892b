"""examples/workflows runs as its README says: the ETL chain and the album chord both
succeed, against a real RabbitMQ, with the jobs store on Redis."""

from __future__ import annotations

import pytest

from examples.workflows.app import make_app
from examples.workflows.start import main
from tests.support.stores import dispose, make_store
from tests.support.worker import running

pytestmark = pytest.mark.broker


async def test_the_example_runs_its_chain_and_its_chord(vhost_url: str) -> None:
    store, token = await make_store("redis", ttl="1h")
    try:
        app = make_app(store)
        async with running(app, vhost_url):
            lines = await main(app, 12)
    finally:
        await dispose("redis", store, token)
    assert lines == [
        "succeeded, 3/3 steps, result 'sales: 6'",
        "succeeded, 13/13 steps, result 12",
    ]
