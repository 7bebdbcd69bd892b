"""The console in a real browser: headless Chromium (Debian's ``chromium``, installed by
``.ci/services/chromium.sh``; ``RABBITFLOW_TEST_CHROMIUM`` names another) driven by
Playwright, against the real broker and a real worker.

Failing messages land in the DLQ, the page shows them without a reload, grouped by error type;
an operator replays one group and then the selected rest; the handler, fixed meanwhile,
succeeds and the DLQ is empty.

``RABBITFLOW_CONSOLE_SCREENSHOTS=docs/img`` also writes the screenshots docs/operations.md shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pydantic import BaseModel

from rabbitflow import App
from rabbitflow import _headers as h
from rabbitflow._worker import Worker, WorkerOptions
from rabbitflow.console import ConsoleSettings, create_app
from rabbitflow.testing.pytest_plugin import unavailable
from tests.support.services import CHROMIUM, require_chromium

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# As root Chromium needs --no-sandbox; the rest keeps a test browser off the network.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "browser-test-token"
Q = "billing.order-created"
DLQ = f"{Q}.dlq"
TOPOLOGY = f"""
[defaults]
retry = {{ delays = ["1s"], max_attempts = 2 }}

[exchanges.orders]
type = "topic"

[queues."{Q}"]
bindings = [{{ exchange = "orders", routing_key = "order.created" }}]

[queues."shipping.order-paid"]
bindings = [{{ exchange = "orders", routing_key = "order.paid" }}]
retry = {{ delays = ["1s", "1m"], max_attempts = 3 }}

[queues."audit.all"]
queue_type = "classic"
bindings = [{{ exchange = "orders", routing_key = "#" }}]
retry = false
"""


class PaymentDeclinedError(Exception):
    # Named as in an application's own module, for the screenshots in docs/.
    __module__ = "billing.payments"


class UpstreamTimeoutError(Exception):
    __module__ = "billing.clients"


class OrderCreated(BaseModel):
    order_id: int
    amount: float


class Billing:
    """The app under test: fails every order until ``fixed``, then records the ones it bills."""

    def __init__(self, topology: Path) -> None:
        self.app = App(topology=topology)
        self.fixed = False
        self.billed: list[int] = []
        self.app.consumer(Q)(self.bill)
        self.app.consumer("audit.all")(self.audit)

    async def bill(self, order: OrderCreated) -> None:
        if not self.fixed:
            if order.order_id % 3 == 0:
                raise UpstreamTimeoutError(f"payment provider timed out for order {order.order_id}")
            raise PaymentDeclinedError(f"card declined for order {order.order_id}")
        self.billed.append(order.order_id)

    async def audit(self, body: bytes) -> None:
        return None


@pytest.fixture(autouse=True)
def _browser() -> None:
    # Before the vhost and the worker: without a browser there is nothing to set up for.
    browser_or_skip()


def browser_or_skip() -> tuple[Any, Any]:
    """Playwright's async API and its ``expect``; a skip (a failure in CI) without them."""
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        unavailable("playwright is not installed", needed_by="the browser tests")
        raise AssertionError("unreachable") from None  # pragma: no cover
    require_chromium()
    return async_playwright, expect


async def until(probe: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def serving(settings: ConsoleSettings) -> AsyncIterator[str]:
    """The console on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await until(lambda: _true(server.started), "the console to listen", timeout=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def working(billing: Billing, url: str) -> AsyncIterator[Worker]:
    worker = Worker(billing.app, billing.app.load_topology(), WorkerOptions(url=url))
    task = asyncio.create_task(worker.run())
    await until(lambda: _true(worker.ready or task.done()), "the worker to consume", timeout=15)
    if task.done():
        task.result()
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)


async def _true(value: bool) -> bool:
    return value


async def test_failing_messages_are_replayed_from_the_page_until_the_dlq_is_empty(
    vhost_url: str, tmp_path: Path
) -> None:
    async_playwright, expect = browser_or_skip()
    shots = Path(os.environ.get("RABBITFLOW_CONSOLE_SCREENSHOTS") or tmp_path)
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(TOPOLOGY)
    billing = Billing(topology_file)
    settings = ConsoleSettings(url=vhost_url, topology=billing.app.load_topology(), token=TOKEN)
    connection = await aio_pika.connect(vhost_url)

    async def dlq_depth() -> int:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(DLQ, passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async with (
        working(billing, vhost_url),
        serving(settings) as base,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1360, "height": 900},
        )
        page = await browser.new_page()
        # Script errors and Content-Security-Policy violations are reported on the console.
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        try:
            # Given: the overview is open (logged in with the token, which then leaves the URL)
            await page.goto(f"{base}/?token={TOKEN}")
            assert page.url == f"{base}/"
            dlq_cell = page.locator(f'tr[data-queue="{Q}"] a.dlq')
            assert await dlq_cell.inner_text() == "0"
            await page.wait_for_selector(".mermaid svg", timeout=15_000)

            # When: six orders fail twice (first attempt, then the 1s retry)
            channel = await connection.channel(publisher_confirms=True)
            orders = await channel.get_exchange("orders")
            for number in range(1, 7):
                body = OrderCreated(order_id=number, amount=9.5 * number).model_dump_json()
                await orders.publish(
                    aio_pika.Message(
                        body.encode(),
                        content_type="application/json",
                        message_id=f"order-{number}",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key="order.created",
                )
            await until(lambda: _equal(dlq_depth(), 6), "six dead letters")

            # Then: the overview shows them without a reload (the table refreshes itself)
            await expect(dlq_cell).to_have_text("6", timeout=15_000)
            # And: a queue nobody consumes, with a message waiting in its 1m tier
            await _park(channel)
            tier = page.locator('[data-tier="shipping.order-paid.retry.1m"]')
            await expect(tier.locator(".count")).to_have_text("1", timeout=15_000)
            assert (await tier.locator(".due").inner_text()).startswith("due in ≈")
            ready = page.locator('tr[data-queue="shipping.order-paid"] td.num').first
            assert await ready.inner_text() == "3"
            await page.screenshot(path=str(shots / "console-overview.png"), full_page=True)

            # And: the DLQ page groups them by error type
            await dlq_cell.click()
            declined = "billing.payments.PaymentDeclinedError"
            timeout = "billing.clients.UpstreamTimeoutError"
            groups = page.locator("#groups tbody tr")
            assert await groups.count() == 2
            assert await _group_count(page, declined) == "4"
            assert await _group_count(page, timeout) == "2"
            await page.screenshot(path=str(shots / "console-dlq.png"), full_page=True)

            # And: the filters narrow the list; a message's page has its stack and headers
            await page.locator('select[name="error_type"]').select_option(timeout)
            await page.locator("#filters button").click()
            rows = page.locator("#messages tbody tr")
            assert await rows.count() == 2
            await rows.first.locator("td.name a").click()
            assert "UpstreamTimeoutError" in await page.locator("#stack").inner_text()
            origin = page.locator("#headers tr", has_text="rabbitflow-origin-queue")
            assert Q in await origin.inner_text()
            await page.screenshot(path=str(shots / "console-message.png"), full_page=True)
            await page.goto(f"{base}/dlq/{Q}")

            # When: the handler is fixed and the operator replays the PaymentDeclined group
            billing.fixed = True
            await page.locator(f'tr[data-error-type="{declined}"] button').click()
            assert "This moves 4 messages" in await page.locator(".confirm p").inner_text()
            await page.locator("#confirm").click()

            # Then: a result line; the four are billed; the other group stays
            result = await page.locator("#result").inner_text()
            assert result == f"moved 4 messages from {DLQ} to {Q}; 2 left in {DLQ}"
            await until(lambda: _equal(_len(billing.billed), 4), "four orders billed")
            assert sorted(billing.billed) == [1, 2, 4, 5]

            # When: the operator selects the rest, one by one, and replays them
            boxes = page.locator('#messages input[name="key"]')
            assert await boxes.count() == 2
            for index in range(2):
                await boxes.nth(index).check()
            await page.locator("#replay-selected").click()
            assert "This moves 2 messages" in await page.locator(".confirm p").inner_text()
            await page.locator("#confirm").click()

            # Then: every order is billed and the DLQ is empty, on the broker and on the page
            assert (await page.locator("#result").inner_text()).startswith("moved 2 messages")
            await until(lambda: _equal(_len(billing.billed), 6), "six orders billed")
            assert sorted(billing.billed) == [1, 2, 3, 4, 5, 6]
            assert await dlq_depth() == 0
            await page.reload()
            assert (await page.locator("#summary").inner_text()).startswith("empty")
            assert problems == []
        finally:
            await browser.close()
            await connection.close()


async def test_the_page_asks_for_the_token_and_read_only_shows_no_button(
    vhost_url: str, tmp_path: Path
) -> None:
    async_playwright, _ = browser_or_skip()
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(TOPOLOGY)
    topology = App(topology=topology_file).load_topology()
    from rabbitflow.topology import derive
    from rabbitflow.topology._declare import declare

    async with await aio_pika.connect(vhost_url) as connection:
        await declare(connection, derive(topology))
        channel = await connection.channel(publisher_confirms=True)
        dlx = await channel.get_exchange("dlx")
        await dlx.publish(
            aio_pika.Message(b"<b>not bold</b>", headers={"rabbitflow-error-type": "E"}),
            routing_key=Q,
        )
    settings = ConsoleSettings(url=vhost_url, topology=topology, token=TOKEN, read_only=True)
    async with serving(settings) as base, async_playwright() as playwright:
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            page = await browser.new_page()
            refused = await page.goto(f"{base}/dlq/{Q}")
            assert refused is not None
            assert refused.status == 401
            await page.goto(f"{base}/dlq/{Q}?token={TOKEN}")
            assert await page.locator('form[method="post"]').count() == 0
            assert await page.locator("button", has_text="Replay").count() == 0
            assert await page.locator("button", has_text="Purge").count() == 0
            assert await page.locator("#messages b").count() == 1  # the error type, not the body
            assert "<b>not bold</b>" in await page.locator("#messages .body code").inner_text()
        finally:
            await browser.close()


async def _park(channel: Any) -> None:
    """Three orders ready in a queue without a consumer, one more in its 1m retry tier."""
    for number in range(3):
        await channel.default_exchange.publish(
            aio_pika.Message(f'{{"order_id": {number}}}'.encode()),
            routing_key="shipping.order-paid",
        )
    failed = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    headers = {h.ATTEMPT: 3, h.FIRST_FAILED_AT: failed, h.ERROR_TYPE: "KeyError"}
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}", headers=headers), routing_key="shipping.order-paid.retry.1m"
    )


async def _group_count(page: Any, error_type: str) -> str:
    cell = page.locator(f'tr[data-error-type="{error_type}"] td.num').first
    return str(await cell.inner_text())


async def _equal(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _len(items: list[int]) -> int:
    return len(items)
