"""A user's own prometheus_client metrics appear on /metrics beside rabbitflow's."""

from __future__ import annotations

import asyncio

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rabbitflow._health import HealthServer  # noqa: E402
from rabbitflow._metrics import Metrics  # noqa: E402

Samples = set[tuple[str, frozenset[tuple[str, str]], float]]


async def _scrape(metrics: Metrics) -> str:
    server = HealthServer(metrics, lambda: True, "127.0.0.1", 0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        response = (await reader.read()).decode()
        writer.close()
    finally:
        await server.close()
    head, _, body = response.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200"), head
    return body


def _samples(text: str, *, prefix: str) -> Samples:
    # prometheus_client's own parser: the output must be valid exposition text as a whole.
    return {
        (sample.name, frozenset(sample.labels.items()), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(prefix)
    }


def _busy(metrics: Metrics) -> None:
    metrics.consumed.labels("billing", "ack").inc(3)
    metrics.duration.histogram("billing").observe(0.02)
    metrics.dead_lettered.labels("billing", "ValueError").inc()
    metrics.ready.labels().set(1)


def test_a_users_counter_shows_beside_rabbitflows_metrics_which_are_unchanged() -> None:
    # given a user's registry with a counter, and a worker's metrics after some deliveries
    registry = prometheus_client.CollectorRegistry()
    orders = prometheus_client.Counter(
        "shop_orders", "Orders billed.", ["region"], registry=registry
    )
    orders.labels("eu").inc(7)
    metrics = Metrics(registry)
    _busy(metrics)

    # when /metrics is scraped
    text = asyncio.run(_scrape(metrics))

    # then the user's counter is there, and rabbitflow's samples are exactly its own render
    assert ("shop_orders_total", frozenset({("region", "eu")}), 7.0) in _samples(
        text, prefix="shop_"
    )
    own = _samples(metrics.render(), prefix="rabbitflow_")
    assert _samples(text, prefix="rabbitflow_") == own
    assert (
        "rabbitflow_messages_total",
        frozenset({("queue", "billing"), ("outcome", "ack")}),
        3.0,
    ) in own


def test_without_a_registry_the_default_registry_is_served() -> None:
    # given a counter in prometheus_client's default REGISTRY
    name = "rabbitflow_test_default_registry_hits"
    counter = prometheus_client.Counter(name.replace("rabbitflow_", "user_"), "Hits.")
    counter.inc(2)
    try:
        # when a worker's metrics (no registry given) are scraped
        text = asyncio.run(_scrape(Metrics()))

        # then the default registry's counter is served too
        assert ("user_test_default_registry_hits_total", frozenset(), 2.0) in _samples(
            text, prefix="user_"
        )
    finally:
        prometheus_client.REGISTRY.unregister(counter)
