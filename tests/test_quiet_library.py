"""rabbitflow used as a library prints nothing: a caller that configures no logging gets no
line from it on stdout or stderr (issue 22: ``[debug] reply for no request in flight``
reached the stdout of a web app through modules that logged with structlog's default
configuration).
"""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rabbitflow import App
from tests.support.amqp import declare_topology
from tests.support.processes import ROOT
from tests.support.worker import running

PACKAGE = ROOT / "rabbitflow"
THE_QUIET_LOGGER = PACKAGE / "_logging.py"


def direct_structlog_loggers(source: str) -> list[int]:
    """Lines of ``source`` that take a structlog logger directly: ``structlog.get_logger``,
    ``structlog.stdlib.get_logger`` or ``from structlog import get_logger``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("structlog"):
            if any(alias.name in {"get_logger", "getLogger"} for alias in node.names):
                found.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in {"get_logger", "getLogger"}
            and ast.unparse(node.value).split(".")[0] == "structlog"
        ):
            found.append(node.lineno)
    return sorted(found)


def test_every_module_logs_through_the_quiet_logger() -> None:
    # structlog's default configuration prints every level to stdout: only
    # rabbitflow._logging.get_logger waits for logging to be configured.
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != THE_QUIET_LOGGER
        for line in direct_structlog_loggers(path.read_text())
    ]
    assert offenders == [], "use rabbitflow._logging.get_logger instead"
    assert direct_structlog_loggers(THE_QUIET_LOGGER.read_text())  # the scan sees its use


def test_the_scan_finds_each_way_of_taking_a_structlog_logger() -> None:
    source = (
        "import structlog\nfrom structlog import get_logger\nlog = structlog.get_logger('x')\n"
        "other = structlog.stdlib.get_logger('y')\nmine = get_logger('z')\n"
    )
    assert direct_structlog_loggers(source) == [2, 3, 4]


CALLER = """
import asyncio
import sys

from rabbitflow import App, RequestTimeout

URL = sys.argv[1]


async def main() -> None:
    app = App(url=URL, topology="missing.toml")
    async with app:
        await app.publish("", "quiet.rpc", {"delay": 0})
        async with app.batch() as batch:
            for n in range(5):
                batch.publish("", "quiet.rpc", {"delay": 0, "n": n})
        await app.publish_many("", "quiet.rpc", [{"delay": 0}, {"delay": 0}])
        assert await app.request("", "quiet.rpc", {"delay": 0}, timeout=5) == {"ok": True}
        try:  # the handler answers after the caller gave up: its reply comes in late
            await app.request("", "quiet.rpc", {"delay": 0.5}, timeout=0.1)
        except RequestTimeout:
            pass
        else:
            raise AssertionError("expected RequestTimeout")
        try:  # nobody consumes this queue
            await app.request("", "quiet.nobody", {}, timeout=0.1)
        except RequestTimeout:
            pass
        await asyncio.sleep(1.0)  # the late reply arrives while the app is still open


asyncio.run(main())
"""

TOPOLOGY = """
[queues."quiet.rpc"]
retry = false

[queues."quiet.nobody"]
retry = false
dead_letter = false
"""


@pytest.mark.broker
async def test_publish_batch_and_requests_print_nothing(vhost_url: str, tmp_path: Path) -> None:
    # Given: a worker answering requests, one of them after its caller gave up
    (tmp_path / "topology.toml").write_text(TOPOLOGY)
    server = App(url=vhost_url, topology=str(tmp_path / "topology.toml"))
    handled: list[object] = []

    @server.consumer("quiet.rpc")
    async def answer(request: dict[str, float]) -> dict[str, bool]:
        await asyncio.sleep(request["delay"])
        handled.append(request)
        return {"ok": True}

    await declare_topology(server, vhost_url)
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(CALLER))
    async with running(server, vhost_url):
        # When: a fresh process that configures no logging publishes, batches and requests
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            vhost_url,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    # Then: it ran through, and nothing of rabbitflow's reached its stdout or stderr
    assert process.returncode == 0, stderr.decode()
    assert len(handled) == 10
    assert stdout.decode() == ""
    assert stderr.decode() == ""
