"""The broker options every command shares: ``--url`` (repeatable) and ``--url-order``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from rabbitflow._urls import resolve_urls
from rabbitflow.types import UrlOrder, UrlSource

F = TypeVar("F", bound=Callable[..., object])


def url_options(func: F) -> F:
    """Add ``--url URL`` (repeat it, or separate nodes with commas) and ``--url-order``."""
    func = click.option(
        "--url-order",
        type=click.Choice(["shuffle", "given"]),
        default="shuffle",
        show_default=True,
        help="shuffle spreads processes over the nodes; given tries them in the order written.",
    )(func)
    return click.option(
        "--url",
        "url",
        metavar="URL",
        multiple=True,
        help="Broker node; repeat for the nodes of a cluster "
        "(else RABBITFLOW_URL, comma-separated, else the file's [broker]).",
    )(func)


def reconnect_option(func: F) -> F:
    """``--reconnect-max-wait SECONDS``: the cap of the backoff over the list of nodes."""
    return click.option(
        "--reconnect-max-wait",
        type=click.FloatRange(min=0.1),
        default=30.0,
        show_default=True,
        help="Longest wait in seconds between rounds over the nodes while none answers.",
    )(func)


def broker_urls(option: UrlSource, file_urls: UrlSource, order: str) -> list[str]:
    """The nodes to use, validated (one ``error:`` line naming a bad URL, password masked)."""
    if isinstance(option, tuple | list) and any(not value.strip() for value in option):
        raise click.BadParameter("an empty URL; give amqp://HOST:PORT/VHOST", param_hint="--url")
    chosen: UrlOrder = "given" if order == "given" else "shuffle"
    return resolve_urls(option, file_urls, order=chosen)
