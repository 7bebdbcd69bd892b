"""``rabbitflow topology ...``: output, exit codes and usage errors, as a user sees them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rabbitflow._urls import mask_url
from tests.test_topology_broker import EXAMPLE, RABBITFLOW, run_cli

BROKEN = '[defaults]\nprefetc = 3\n[queues.a]\nretry = { delays = ["5s", "5 parsecs"] }\n'


def test_validate_prints_a_summary() -> None:
    result = run_cli("topology", "validate", str(EXAMPLE))

    assert result.exit_code == 0
    assert result.stdout == (
        f"{EXAMPLE}: valid; 4 exchanges, 4 queues, 8 retry tiers, 4 dead-letter queues, "
        "10 bindings\n"
    )


def test_validate_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(BROKEN, encoding="utf-8")

    result = run_cli("topology", "validate", str(path))

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {path}: 2 errors",
        '  defaults.prefetc: unknown key (did you mean "prefetch"?)',
        "  queues.a.retry.delays[1]: '5 parsecs' is not a duration; write a number with a unit "
        '("250ms", "5s", "1m", "2h", "7d") or an integer of milliseconds',
    ]
    assert result.stdout == ""


def test_validate_warns_of_a_duration_that_is_likely_seconds(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text("[queues.jobs]\ntimeout = 30\n", encoding="utf-8")

    result = run_cli("topology", "validate", str(path))

    assert result.exit_code == 0
    assert result.stderr == (
        f'warning: {path}: queues.jobs.timeout: 30 ms; did you mean "30s"? '
        '(an integer is milliseconds; write "30s", or "30ms" to keep 30 ms)\n'
    )
    assert result.stdout.startswith(f"{path}: valid; ")


def test_validate_lists_warnings_after_the_errors(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text('[queues.jobs]\ntimeout = 30\ndead_letter = "false"\n', encoding="utf-8")

    result = run_cli("topology", "validate", str(path))

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {path}: 1 error",
        "  queues.jobs.dead_letter: 'false' is a string, not true or false "
        "(write dead_letter = false, without quotes)",
        '  warning: queues.jobs.timeout: 30 ms; did you mean "30s"? '
        '(an integer is milliseconds; write "30s", or "30ms" to keep 30 ms)',
    ]


def test_validate_reads_topology_toml_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "topology.toml").write_text("[queues.jobs]\nretry = false\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    result = run_cli("topology", "validate")

    assert result.exit_code == 0
    assert result.stdout.startswith("topology.toml: valid; 1 exchange, 1 queue, 0 retry tiers")


def test_validate_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    result = run_cli("topology", "validate")

    assert result.exit_code == 1
    assert result.stderr.startswith("error: topology.toml: 1 error\n  file not found")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(BROKEN, encoding="utf-8")

    result = run_cli("--debug", "topology", "validate", str(path))

    assert result.exit_code == 1
    assert type(result.exception).__name__ == "TopologyError"


@pytest.mark.parametrize(
    "args",
    [
        ["topology", "export", str(EXAMPLE)],  # --format is required
        ["topology", "export", str(EXAMPLE), "--format", "yaml"],
        ["topology", "declare", "--nope"],
        ["topology", "frobnicate"],
        ["topology", "validate", "a.toml", "b.toml"],
    ],
    ids=["no format", "bad format", "unknown option", "unknown command", "two files"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run_cli(*args)

    assert result.exit_code == 2
    assert "Usage:" in result.stderr


def test_export_definitions_to_stdout() -> None:
    result = run_cli("topology", "export", str(EXAMPLE), "--format", "definitions")

    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert {q["vhost"] for q in document["queues"]} == {"/"}
    assert "support.vip-orders.retry.5s" in [q["name"] for q in document["queues"]]


def test_export_mermaid_to_a_file(tmp_path: Path) -> None:
    output = tmp_path / "topology.mmd"

    result = run_cli(
        "topology", "export", str(EXAMPLE), "--format", "mermaid", "--output", str(output)
    )

    assert result.exit_code == 0
    assert result.stdout == ""
    assert output.read_text(encoding="utf-8").startswith("flowchart LR\n")


def test_export_warns_about_exclusive_queues(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(
        '[queues.mine]\nqueue_type = "classic"\nexclusive = true\nretry = false\n', encoding="utf-8"
    )

    result = run_cli("topology", "export", str(path), "--format", "definitions")

    assert result.exit_code == 0
    assert result.stderr.startswith("warning: queue 'mine' is exclusive")
    assert [q["name"] for q in json.loads(result.stdout)["queues"]] == ["mine.dlq"]


def test_validate_in_a_real_process() -> None:
    done = subprocess.run(
        [str(RABBITFLOW), "topology", "validate", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "4 queues, 8 retry tiers" in done.stdout


@pytest.mark.broker
def test_declare_and_plan_in_a_real_process(vhost_url: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(RABBITFLOW), "topology", *args, str(EXAMPLE), "--url", vhost_url]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    declared = run("declare")
    planned = run("plan")

    assert declared.returncode == 0, declared.stderr
    assert mask_url(vhost_url) in declared.stdout
    assert f":{urlsplit(vhost_url).password}@" not in declared.stdout + planned.stdout
    assert declared.stdout.rstrip().endswith("declared 4 exchanges, 16 queues, 10 bindings")
    assert planned.returncode == 0, planned.stderr
    # Bindings are compared when the management API answers, listed as "bind" when not.
    seen = {"0 create, 30 ok, 0 conflict", "0 create, 20 ok, 0 conflict, 10 bind"}
    assert seen & set(planned.stdout.splitlines()), planned.stdout
