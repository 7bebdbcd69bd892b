"""The console's outbox page against a real outbox table: the lag, pending rows, and parked
rows with their errors; a link from every page; an unreachable PostgreSQL is an error page."""

from __future__ import annotations

import httpx
import psycopg
import pytest

from rabbitflow import App
from rabbitflow.console import ConsoleSettings, create_app
from rabbitflow.outbox import PostgresOutbox
from rabbitflow.topology import parse_topology
from tests.support.outbox import Sink, count_rows, outbox_in_own_schema, write_rows
from tests.support.services import POSTGRES_URL

pytestmark = pytest.mark.broker

TOPOLOGY = """
[queues.work]
"""


async def page(url: str, outbox: PostgresOutbox | None, path: str) -> httpx.Response:
    settings = ConsoleSettings(url=url, topology=parse_topology(TOPOLOGY, "t.toml"), outbox=outbox)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await http.get(path)
    finally:
        await app.state.console.link.close()


async def test_the_outbox_page_shows_pending_rows_the_lag_and_parked_rows(vhost_url: str) -> None:
    async with (
        outbox_in_own_schema(max_attempts=1, lag_warning=0.001) as outbox,
        Sink(vhost_url),
    ):
        # Given one row parked by a relay (its exchange is missing) and three left pending
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn, conn.transaction():
            await outbox.publish(conn, "no-such-exchange", "x", {}, message_id="lost-1")
        app = App(url=vhost_url, outbox=outbox)
        async with outbox.relaying(app) as relay:
            while relay.parked < 1:
                await _tick()
        await app.close()
        await write_rows(outbox, 3, prefix="waiting")
        assert await count_rows(outbox, "pending") == 3
        # When the operator opens the outbox page
        response = await page(vhost_url, outbox, "/outbox")
        # Then it shows the lag over the threshold, the pending rows and the parked one
        assert response.status_code == 200
        html = response.text
        assert "3 pending" in html
        assert "1 parked" in html
        assert 'id="outbox-lag"' in html
        assert "waiting-0" in html
        assert "lost-1" in html
        assert "no exchange &#39;no-such-exchange&#39;" in html
        # And every page links to it
        overview = await page(vhost_url, outbox, "/")
        assert 'href="/outbox"' in overview.text


async def test_without_an_outbox_there_is_no_page_and_no_link(vhost_url: str) -> None:
    assert (await page(vhost_url, None, "/outbox")).status_code == 404
    assert 'href="/outbox"' not in (await page(vhost_url, None, "/")).text


async def test_an_unreachable_postgresql_is_an_error_page(vhost_url: str) -> None:
    outbox = PostgresOutbox("postgresql://postgres@127.0.0.1:5719/none")
    response = await page(vhost_url, outbox, "/outbox")
    assert response.status_code == 502
    assert "did not answer the outbox page" in response.text


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.05)
