"""Help texts a newcomer reads, `--version`, and the imports that keep the CLI fast."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rabbitflow import cli as cli_module
from rabbitflow.cli import COMMANDS, cli

EXAMPLE = Path(__file__).resolve().parent.parent / "topology.toml"

RST = re.compile(r"``|:[a-z]+:`|`")


def commands() -> Iterator[tuple[str, click.Command]]:
    cli_module._register()

    def walk(path: str, command: click.Command) -> Iterator[tuple[str, click.Command]]:
        yield path, command
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                yield from walk(f"{path} {name}", sub)

    yield from walk("rabbitflow", cli)


ALL = list(commands())


@pytest.mark.parametrize(("path", "command"), ALL, ids=[path for path, _ in ALL])
def test_help_has_no_markup_and_no_cut_sentence(path: str, command: click.Command) -> None:
    texts = [command.help or ""]
    texts += [getattr(param, "help", None) or "" for param in command.params]
    for text in texts:
        assert not RST.search(text), f"{path}: {text!r}"
    short = command.get_short_help_str(limit=80)
    assert not short.endswith("..."), f"{path}: short help cut: {short!r}"
    assert "(e.g." not in short, f"{path}: {short!r}"


def test_the_top_level_list_matches_each_commands_first_sentence() -> None:
    for name, (_, _, short) in COMMANDS.items():
        command = cli.commands[name]
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert " ".join(first.split()).startswith(short), (name, first, short)


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = CliRunner().invoke(cli, [flag], prog_name="rabbitflow")
    assert result.exit_code == 0
    assert re.fullmatch(r"rabbitflow \d+\.\d+\.\d+\S*\n", result.output), result.output


@pytest.mark.parametrize(
    "args",
    [["--help"], ["topology", "validate", "--help"], ["topology", "validate", str(EXAMPLE)]],
)
def test_help_and_validate_do_not_load_the_amqp_client_or_opentelemetry(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from rabbitflow.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('aio_pika', 'aiormq', 'opentelemetry', 'asyncio') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "HEAVY []" in result.stdout, result.stdout
