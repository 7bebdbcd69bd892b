"""``rabbitflow publish EXCHANGE ROUTING_KEY BODY``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rabbitflow.cli import amqp_name, quiet_client_logs, reports_errors
from rabbitflow.cli._urls import broker_urls, url_options
from rabbitflow.errors import ConfigurationError
from rabbitflow.topology import load_topology

JSON = "application/json"
TEXT = "text/plain"


def _header(value: str) -> tuple[str, str]:
    key, sep, text = value.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--header")
    return key, text


@click.command()
@click.argument("exchange", callback=amqp_name("exchange"))
@click.argument("routing_key")
@click.argument("body")
@click.option("--header", "-H", "headers", multiple=True, help="KEY=VALUE, repeatable.")
@click.option(
    "--content-type",
    help="Default: application/json, and BODY must then be valid JSON. Any other type is sent "
    "as given, unchecked.",
)
@click.option(
    "--raw", is_flag=True, help="Send BODY unchecked, as text/plain unless --content-type."
)
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
    raw: bool,
    message_id: str | None,
    correlation_id: str | None,
    url: tuple[str, ...],
    url_order: str,
    topology_path: Path,
) -> None:
    """Publish BODY with publisher confirms.

    BODY is JSON unless --raw or --content-type says otherwise; "-" reads it from stdin. The
    message is persistent and mandatory: a message no queue receives is an error. Use "" as
    EXCHANGE for the default exchange (ROUTING_KEY is then a queue name)."""
    parsed_headers = dict(_header(h) for h in headers)
    text = sys.stdin.read() if body == "-" else body
    content_type = content_type or (TEXT if raw else JSON)
    if not raw and _is_json(content_type):
        _check_json(text, content_type)
    payload = text.encode()
    file_urls = load_topology(topology_path).broker_urls if topology_path.exists() else ()
    urls = broker_urls(url, file_urls, url_order)
    quiet_client_logs()
    import asyncio

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


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON or media.endswith("+json")


def _check_json(text: str, content_type: str) -> None:
    # A consumer would dead-letter a body that does not parse: refuse it here instead.
    try:
        json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(
            f"BODY is not valid JSON ({exc}); fix it, or send it as text with "
            "--content-type text/plain or --raw"
        ) from None


async def _publish(
    urls: list[str],
    exchange: str,
    routing_key: str,
    payload: object,
    headers: dict[str, str],
    content_type: str | None,
    message_id: str | None,
    correlation_id: str | None,
) -> str:
    from rabbitflow._publisher import Publisher
    from rabbitflow.connection import connect, underlay

    connection = await connect(urls, name="rabbitflow-publish")
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
