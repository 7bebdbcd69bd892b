"""`rabbitflow publish`: a JSON body is sent byte for byte; anything else needs saying so."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from rabbitflow import cli
from tests.support.amqp import drain
from tests.support.topology import work_topology


def rabbitflow(*args: str) -> Result:
    cli._register()
    return CliRunner().invoke(cli.cli, list(args), prog_name="rabbitflow")


def test_bodies_arrive_as_published(vhost_url: str, tmp_path: Path) -> None:
    # Given the work topology declared
    declared = rabbitflow("topology", "declare", str(work_topology(tmp_path)), "--url", vhost_url)
    assert declared.exit_code == 0, declared.output

    # When a JSON string, a text body with --raw and one with a content type are published
    sent = [
        rabbitflow("publish", "jobs", "work", '"hello"', "--url", vhost_url),
        rabbitflow("publish", "jobs", "work", "hello", "--raw", "--url", vhost_url),
        rabbitflow(
            "publish", "jobs", "work", "a,b", "--content-type", "text/csv", "--url", vhost_url
        ),
    ]

    # Then each arrives with its own bytes and content type
    assert [result.exit_code for result in sent] == [0, 0, 0], [r.output for r in sent]
    got = [(m.body, m.content_type) for m in drain(vhost_url, "work")]
    assert got == [
        (b'"hello"', "application/json"),
        (b"hello", "text/plain"),
        (b"a,b", "text/csv"),
    ]


def test_invalid_json_is_refused_and_not_published(vhost_url: str, tmp_path: Path) -> None:
    declared = rabbitflow("topology", "declare", str(work_topology(tmp_path)), "--url", vhost_url)
    assert declared.exit_code == 0, declared.output

    result = rabbitflow("publish", "jobs", "work", "{'n': 1}", "--url", vhost_url)

    assert result.exit_code == 1
    assert result.output.startswith("error: BODY is not valid JSON (")
    assert "--content-type text/plain or --raw" in result.output
    assert drain(vhost_url, "work") == []
