"""A topology declared by an earlier rabbitflow keeps working after an upgrade."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiormq
import pytest

from tests.support.processes import run_cli

pytestmark = pytest.mark.broker


async def _declare_old_style(url: str) -> None:
    # What rabbitflow declared for a quorum work queue before at-least-once dead-lettering.
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_declare(
            "billing",
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": "dlx",
                "x-dead-letter-routing-key": "billing",
                "x-delivery-limit": 10,
            },
        )
    finally:
        await connection.close()


def test_a_work_queue_from_an_earlier_release_is_kept_with_a_warning(
    tmp_path: Path, vhost_url: str
) -> None:
    # Given a work queue declared without x-dead-letter-strategy and x-overflow
    asyncio.run(_declare_old_style(vhost_url))
    topology = tmp_path / "topology.toml"
    topology.write_text("[queues.billing]\n")

    # When the topology is declared again by this release
    result = run_cli("topology", "declare", str(topology), "--url", vhost_url)

    # Then it succeeds, keeps the queue, and says what the old queue lacks and how to add it
    assert result.returncode == 0, result.stderr
    assert "declared 1 exchange, 5 queues, 1 binding" in result.stdout  # 3 tiers, the DLQ
    assert (
        "queue 'billing' was declared without x-dead-letter-strategy (by an earlier rabbitflow) "
        "and is kept as it is"
    ) in result.stderr
    assert "dead-letter-strategy = at-least-once" in result.stderr
    # and a queue argument that really conflicts is still refused
    topology.write_text('[queues.billing]\nqueue_type = "classic"\n')
    refused = run_cli("topology", "declare", str(topology), "--url", vhost_url)
    assert refused.returncode == 1
