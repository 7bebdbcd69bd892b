"""``rabbitflow publish EXCHANGE ROUTING_KEY BODY``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from rabbitflow.cli import quiet_client_logs, reports_errors
from rabbitflow.cli.urls import broker_urls, url_options
from rabbitflow.connection import connect, underlay
from rabbitflow.publisher import Publisher
from rabbitflow.topology import load_topology


def _header(value: str) -> tuple[str, str]:
    key, sep, text = value.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--header")
    return key, text


@click.command()
@click.argument("exchange")
@click.argument("routing_key")
@click.argument("body")
@click.option("--header", "-H", "headers", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--content-type", help="Default: application/json when BODY is JSON, else text.")
@click.option("--message-id", help="Default: a new UUID.")
@click.option("--correlation-id")
@url_options
@click.option(
    "--topology",
    "topology_path",
    type=click.Path(path_type=Path),
    default="topology.toml",
    show_default=True,
    help="Read only for [broker].url / urls.",
)
@reports_errors
def publish(
    exchange: str,
    routing_key: str,
    body: str,
    headers: tuple[str, ...],
    content_type: str | None,
    message_id: str | None,
    correlation_id: str | None,
    url: tuple[str, ...],
    url_order: str,
    topology_path: Path,
) -> None:
    """Publish BODY (``-`` reads stdin) with publisher confirms; mandatory, persistent.

    Use "" as EXCHANGE for the default exchange (ROUTING_KEY is then a queue name)."""
    parsed_headers = dict(_header(h) for h in headers)
    text = sys.stdin.read() if body == "-" else body
    payload: object = text
    if content_type is None:
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
    file_urls = load_topology(topology_path).broker_urls if topology_path.exists() else ()
    urls = broker_urls(url, file_urls, url_order)
    quiet_client_logs()
    sent = asyncio.run(
        _publish(
            urls,
            exchange,
            routing_key,
            payload,
            parsed_headers,
            content_type,
            message_id,
            correlation_id,
        )
    )
    click.echo(f"published {sent} to exchange {exchange!r} with routing key {routing_key!r}")


async def _publish(
    url: list[str],
    exchange: str,
    routing_key: str,
    payload: object,
    headers: dict[str, str],
    content_type: str | None,
    message_id: str | None,
    correlation_id: str | None,
) -> str:
    connection = await connect(url, name="rabbitflow-publish")
    try:
        publisher = await Publisher.open(underlay(connection))
        return await publisher.publish(
            exchange,
            routing_key,
            payload,
            headers=headers or None,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
        )
    finally:
        await connection.close()
