"""The quickstart's files, as a new user copies them, pass their tests without a warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from rabbitflow import cli

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "docs" / "quickstart.md"
FILE_BLOCK = re.compile(r"```(?:python|toml)\n# (\S+\.(?:py|toml))\n(.*?)```", re.S)


def copy_quickstart(directory: Path) -> list[str]:
    names = []
    for name, body in FILE_BLOCK.findall(QUICKSTART.read_text(encoding="utf-8")):
        (directory / name).write_text(f"# {name}\n{body}", encoding="utf-8")
        names.append(name)
    return names


def test_the_quickstart_tests_pass_without_warnings(tmp_path: Path) -> None:
    assert {"pyproject.toml", "topology.toml", "app.py", "test_app.py"} <= set(
        copy_quickstart(tmp_path)
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^3 passed in ", result.stdout, re.M), output
    assert "warning" not in output.lower(), output


def test_the_quickstart_topology_validates(tmp_path: Path) -> None:
    copy_quickstart(tmp_path)
    cli._register()
    result = CliRunner().invoke(
        cli.cli, ["topology", "validate", str(tmp_path / "topology.toml")], prog_name="rabbitflow"
    )
    assert result.exit_code == 0, result.output
    assert "1 queue, 3 retry tiers, 1 dead-letter queue" in result.output
