"""``rabbitflow docs asyncapi MODULE:APP``: an AsyncAPI 3.0 document of the app."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rabbitflow._asyncapi import build
from rabbitflow._importer import UserImportError, load_app
from rabbitflow.cli import reports_errors, write_output


@click.group()
def docs() -> None:
    """Generate documentation from an app and its topology."""


@docs.command()
@click.argument("target", metavar="MODULE:APP")
@click.option(
    "--topology",
    "topology_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Topology file; defaults to the app's own (topology.toml).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the document here instead of standard output.",
)
@click.option("--title", help="info.title; defaults to the app's name.")
@click.option("--version", "doc_version", default="1.0.0", show_default=True, help="info.version.")
@reports_errors
def asyncapi(
    target: str,
    topology_path: Path | None,
    output: Path | None,
    title: str | None,
    doc_version: str,
) -> None:
    """Print an AsyncAPI 3.0.0 document (JSON) of MODULE:APP.

    Exchanges and queues become channels with AMQP bindings, handlers receive operations, and
    payloads JSON Schema."""
    try:
        app = load_app(target)
    except UserImportError as exc:
        click.echo(
            f"error: importing {exc.module!r} failed (the traceback is from your code):", err=True
        )
        click.echo(exc.trace, err=True)
        sys.exit(1)
    topology = app.load_topology(topology_path)
    text = json.dumps(build(app, topology, title=title, version=doc_version), indent=2)
    if output is None:
        click.echo(text)
    else:
        write_output(output, text + "\n")
        click.echo(f"wrote {output}", err=True)
