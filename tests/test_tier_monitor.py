"""The tier monitor on a real broker: gauges, and a tier whose messages cannot go back."""

from __future__ import annotations

import functools
from pathlib import Path

import aiormq
import pytest
from structlog.testing import capture_logs

from rabbitflow._metrics import Metrics
from rabbitflow._retries import TierMonitor
from rabbitflow.topology import derive
from rabbitflow.topology._management import (
    configured_url,
    queue_depths,
    vhost_of,
    with_credentials,
)
from tests.support.amqp import declare_topology, publish_many
from tests.support.broker import Rabbit
from tests.support.topology import app_for
from tests.support.waiting import eventually

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.mark.management
async def test_a_tier_whose_messages_cannot_go_back_is_reported(
    tmp_path: Path, vhost_url: str, rabbit: Rabbit, vhost: str
) -> None:
    # Given a quorum queue deleted by an operator while two copies wait in its 100 ms tier
    app = app_for(tmp_path, '[queues.full]\nretry = { delays = ["100ms"] }\n')
    declarations = derive(app.load_topology())
    await declare_topology(app, vhost_url)
    rabbit.admin.delete_queue(vhost, "full")
    await publish_many(vhost_url, "full.retry.100ms", ["m-1", "m-2"])

    # When the monitor samples the tier twice, more than twice its delay apart (the
    # management statistics lag by up to 5 s)
    metrics = Metrics()
    api = with_credentials(configured_url(), vhost_url)  # as the worker does
    depths = functools.partial(queue_depths, api, vhost_of(vhost_url))
    monitor = TierMonitor([declarations.routes["full"]], metrics, interval=0.1, depths=depths)
    amqp = await aiormq.connect(vhost_url)
    try:
        with capture_logs() as logs:

            async def warned() -> bool:
                await monitor.sample(await amqp.channel())
                return any(line["log_level"] == "warning" for line in logs)

            await eventually(warned, "the monitor to warn", 25, 0.5)
    finally:
        await amqp.close()

    # Then it warns that the tier's messages cannot go back to `full` (the tier dead-letters
    # at-least-once, so it keeps them and retries), and the gauge counts
    # them (they are no longer ready: a passive declare would say 0)
    [warning] = [line for line in logs if line["log_level"] == "warning"]
    assert warning["held_in"] == "full.retry.100ms"
    assert warning["messages"] == 2
    assert 'rabbitflow_retry_tier_messages{queue="full",tier="100ms"} 2' in metrics.render()


async def test_without_the_management_api_depths_come_from_passive_declares(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a queue with a 1 h tier holding one message, and a management URL that answers
    # nothing
    app = app_for(tmp_path, '[queues.slow]\nretry = { delays = ["1h"] }\n')
    declarations = derive(app.load_topology())
    await declare_topology(app, vhost_url)
    await publish_many(vhost_url, "slow.retry.1h", ["m-1"])
    await publish_many(vhost_url, "slow.dlq", ["m-2"])
    metrics = Metrics()
    nowhere = functools.partial(queue_depths, "http://guest:guest@127.0.0.1:9/", "/")
    monitor = TierMonitor([declarations.routes["slow"]], metrics, depths=nowhere)

    # When it samples
    amqp = await aiormq.connect(vhost_url)
    try:
        with capture_logs() as logs:
            await monitor.sample(await amqp.channel())
    finally:
        await amqp.close()

    # Then it says once that it falls back, and the gauges still count the ready messages
    assert [line["event"] for line in logs if line["log_level"] == "info"] == [
        "management API not available: tier depths from passive declares; messages held by "
        "the broker's dead-lettering not detected"
    ]
    rendered = metrics.render()
    assert 'rabbitflow_retry_tier_messages{queue="slow",tier="1h"} 1' in rendered
    assert 'rabbitflow_dlq_messages{queue="slow"} 1' in rendered
