"""``rabbitflow retries list``: what waits in a queue's retry tiers (docs/recoverability.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from rabbitflow import _retries as ops
from rabbitflow._held import note
from rabbitflow.cli._dlq import Broker, held_json, list_options
from rabbitflow.errors import ConfigurationError
from rabbitflow.topology import derive


@click.group()
def retries() -> None:
    """Inspect the retry tiers of a queue (QUEUE.retry.<delay>)."""


@retries.command("list")
@list_options("How many messages to show per tier, oldest first.")
def list_command(
    queue: str,
    limit: int,
    as_json: bool,
    management_url: str | None,
    url: tuple[str, ...],
    url_order: str,
    topology_file: str,
) -> None:
    """Show what waits in each retry tier of QUEUE.

    For each tier: how many messages wait, when each is due, and whether the oldest is
    overdue (a stuck tier), and the messages the broker's dead-lettering holds in each tier
    and in QUEUE (from the management API). Leaves the tiers as they were."""
    broker = Broker.resolve(url, topology_file, url_order)
    if broker.topology is None:
        raise ConfigurationError(
            f"retries list needs the topology file that declares {queue!r} (--topology FILE)"
        )
    routes = derive(broker.topology).routes.get(queue)
    if routes is None:
        raise ConfigurationError(f"queue {queue!r} is not in {broker.topology.source}")
    tiers = broker.run(
        queue, "rabbitflow retries list", lambda c: ops.waiting(c, routes, limit=limit)
    )
    held = broker.held(management_url)
    now = datetime.now(UTC)
    names = [queue, *(tier.name for tier in tiers)]
    if as_json:
        document = {
            "queue": queue,
            "tiers": [tier.to_json(now) for tier in tiers],
            "held_by_broker": held_json(held, names),
        }
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join([*ops.render(queue, tiers, now), *note(held, names)]))
