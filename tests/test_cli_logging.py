"""Logging a user sees: nothing from rabbitflow in a library user's stdout, and no AMQP client
lines next to rabbitflow's own in the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "amqp://app:s3cret-pw@127.0.0.1:1/"

LIBRARY_USER = """
import logging, sys
from rabbitflow._logging import get_logger

log = get_logger("rabbitflow.app")
log.info("publisher connected", url="amqp://u:hunter2@h/")
log.warning("something to know", url="amqp://u:hunter2@h/")
if sys.argv[1:] == ["configured"]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    log.info("publisher connected", url="amqp://u:hunter2@h/")
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=ROOT
    )


def test_a_library_user_gets_stdlib_logging_behaviour() -> None:
    # Unconfigured: like any stdlib logger, warnings reach stderr, info nothing, stdout nothing.
    plain = python(LIBRARY_USER)
    assert plain.stdout == ""
    assert plain.stderr == "something to know (url=amqp://u:***@h/)\n"
    # Configured by the user: rabbitflow's lines follow that configuration.
    configured = python(LIBRARY_USER, "configured")
    assert configured.stdout == ""
    assert "INFO rabbitflow.app publisher connected (url=amqp://u:***@h/)" in configured.stderr
    assert "hunter2" not in configured.stderr


def test_run_shows_no_client_log_lines_during_an_outage() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RABBITFLOW_URL"}
    args = ["run", "examples.orders.app:app", "--url", UNREACHABLE, "--log-format", "json"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "rabbitflow", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stderr is not None
    lines = []
    for line in worker.stderr:  # until the second connection attempt failed
        lines.append(line)
        if sum("broker unreachable" in seen for seen in lines) == 2:
            break
    worker.send_signal(signal.SIGTERM)
    rest, _ = worker.communicate(timeout=30)
    output = "".join(lines) + rest
    assert "broker unreachable; retrying" in output
    assert "aiormq" not in output, output
    assert "error when creating transport" not in output, output


LOGGING_CHILD = """
import sys
from rabbitflow._logging import configure_logging, get_logger
configure_logging("json", worker=int(sys.argv[1]))
log = get_logger("rabbitflow.test")
for n in range(3000):
    log.info("stopped", n=n)
"""


def test_workers_sharing_one_unbuffered_output_write_whole_json_lines(tmp_path: Path) -> None:
    # Given four --workers children writing to one file with an unbuffered stderr
    # (PYTHONUNBUFFERED=1, as in many container images), all logging at the same moment
    out = tmp_path / "out.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with out.open("ab") as sink:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", LOGGING_CHILD, str(index)],
                stderr=sink,
                env=env,
                cwd=Path(__file__).resolve().parent.parent,
            )
            for index in range(4)
        ]
        codes = [child.wait(60) for child in children]
    assert codes == [0, 0, 0, 0]
    # Then every line is one whole JSON object: none was cut by another child's line
    lines = out.read_text().splitlines()
    broken = [line for line in lines if not _is_json(line)]
    assert broken == []
    assert len(lines) == 4 * 3000


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
