"""Every command with bad arguments: one clear line, exit 1 (or 2 for usage), never a traceback,
never the password of the URL. Each case is a whole `rabbitflow` process, as a user runs it."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.broker import Rabbit
from tests.support.processes import ROOT, run_cli

SECRET = "s3cret-pw"
UNREACHABLE = f"amqp://app:{SECRET}@127.0.0.1:1/"

BAD_TOPOLOGY = (
    '[exchanges.orders]\ntype = "topik"\n'
    '[queues."café"]\nprefetch = 0\nbindings = [{ exchange = "order" }]\n'
)
APP_MODULE = """
import os

from pydantic import BaseModel

from rabbitflow import App


class Order(BaseModel):
    order_id: int


def not_a_factory():
    return 42


app = App(topology="topology.toml")
"""


def rabbitflow(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=timeout, extra_env={"PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "topology.toml").write_text("[queues.jobs]\n", encoding="utf-8")
    (root / "bad.toml").write_text(BAD_TOPOLOGY, encoding="utf-8")
    (root / "latin1.toml").write_bytes("[queues.a]\n# café\n".encode("latin-1"))
    (root / "badapp.py").write_text(APP_MODULE, encoding="utf-8")
    (root / "adir").mkdir()
    return root


# (id, arguments, expected exit code, a fragment of the error)
CASES: list[tuple[str, list[str], int, str]] = [
    ("unknown command", ["frobnicate"], 2, "No such command"),
    ("unknown option", ["--frobnicate"], 2, "No such option"),
    ("validate: missing file", ["topology", "validate", "nope.toml"], 1, "file not found"),
    ("validate: a directory", ["topology", "validate", "adir"], 2, "is a directory"),
    ("validate: not UTF-8", ["topology", "validate", "latin1.toml"], 1, "not valid UTF-8"),
    (
        "validate: schema and reference errors together",
        ["topology", "validate", "bad.toml"],
        1,
        "exchange 'order' is not declared",
    ),
    ("plan: invalid file", ["topology", "plan", "bad.toml", "--url", UNREACHABLE], 1, "4 errors"),
    ("declare: unreachable", ["topology", "declare", "--url", UNREACHABLE], 1, "127.0.0.1"),
    ("plan: unreachable", ["topology", "plan", "--url", UNREACHABLE], 1, "127.0.0.1"),
    ("export: no format", ["topology", "export"], 2, "--format"),
    ("export: unknown format", ["topology", "export", "--format", "xml"], 2, "xml"),
    (
        "export: unwritable output",
        ["topology", "export", "--format", "mermaid", "-o", "/nonexistent/dir/topology.md"],
        1,
        "cannot write '/nonexistent/dir/topology.md'",
    ),
    ("run: no colon", ["run", "badapp"], 1, "must be"),
    ("run: missing module", ["run", "nosuchmodule:app", "--url", UNREACHABLE], 1, "could not"),
    ("run: missing attribute", ["run", "badapp:nope", "--url", UNREACHABLE], 1, "no attribute"),
    (
        "run: a pydantic model",
        ["run", "badapp:Order", "--url", UNREACHABLE],
        1,
        "the class Order (a pydantic model), not a rabbitflow App",
    ),
    (
        "run: a factory returning something else",
        ["run", "badapp:not_a_factory", "--url", UNREACHABLE],
        1,
        "returned an int, not a rabbitflow App",
    ),
    ("run: a module", ["run", "badapp:os", "--url", UNREACHABLE], 1, "the module 'os'"),
    ("run: workers 0", ["run", "badapp:app", "--workers", "0"], 2, "--workers"),
    ("run: log level", ["run", "badapp:app", "--log-level", "loud"], 2, "--log-level"),
    ("run: loop", ["run", "badapp:app", "--loop", "trio"], 2, "--loop"),
    (
        "run: missing topology",
        ["run", "badapp:app", "--topology", "nope.toml", "--url", UNREACHABLE],
        1,
        "file not found",
    ),
    ("publish: invalid JSON", ["publish", "", "jobs", "{oops", "--url", UNREACHABLE], 1, "JSON"),
    (
        "publish: invalid JSON content type",
        ["publish", "", "jobs", "{", "--content-type", "application/json", "--url", UNREACHABLE],
        1,
        "--raw",
    ),
    ("publish: bad exchange name", ["publish", "ordérs", "k", "{}"], 2, "exchange names"),
    ("publish: bad header", ["publish", "", "jobs", "{}", "-H", "novalue"], 2, "KEY=VALUE"),
    ("publish: missing body", ["publish", "", "jobs"], 2, "BODY"),
    ("publish: unreachable", ["publish", "", "jobs", "{}", "--url", UNREACHABLE], 1, "127.0.0.1"),
    ("dlq list: bad queue name", ["dlq", "list", "café"], 2, "queue names"),
    ("dlq list: wildcard queue name", ["dlq", "list", "jobs*"], 2, "queue names"),
    ("dlq list: negative limit", ["dlq", "list", "jobs", "--limit", "-1"], 2, "--limit"),
    ("dlq list: unreachable", ["dlq", "list", "jobs", "--url", UNREACHABLE], 1, "127.0.0.1"),
    ("dlq replay: unreachable", ["dlq", "replay", "jobs", "--url", UNREACHABLE], 1, "127.0.0.1"),
    ("dlq replay: limit 0", ["dlq", "replay", "jobs", "--limit", "0"], 2, "--limit"),
    (
        "dlq purge: unreachable",
        ["dlq", "purge", "jobs", "--yes", "--url", UNREACHABLE],
        1,
        "127.0.0.1",
    ),
    (
        "dlq: missing named topology",
        ["dlq", "list", "jobs", "--topology", "nope.toml"],
        1,
        "nope.toml",
    ),
    ("docs: not an app", ["docs", "asyncapi", "badapp:Order"], 1, "not a rabbitflow App"),
    ("docs: missing module", ["docs", "asyncapi", "nosuchmodule:app"], 1, "could not import"),
    (
        "docs: unwritable output",
        ["docs", "asyncapi", "badapp:app", "-o", "/nonexistent/asyncapi.json"],
        1,
        "cannot write",
    ),
]

URL_CASES: list[tuple[str, list[str]]] = [
    ("declare: not a URL", ["topology", "declare", "--url", "not a url"]),
    ("declare: http scheme", ["topology", "declare", "--url", f"http://u:{SECRET}@127.0.0.1:1/"]),
    ("run: ftp scheme", ["run", "badapp:app", "--url", f"ftp://u:{SECRET}@127.0.0.1:1/"]),
    ("dlq list: port not a number", ["dlq", "list", "jobs", "--url", f"amqp://u:{SECRET}@h:x/"]),
    ("publish: port out of range", ["publish", "", "j", "{}", "--url", "amqp://h:70000/"]),
    ("plan: empty URL", ["topology", "plan", "--url", ""]),
]


def assert_one_clear_error(
    result: subprocess.CompletedProcess[str], codes: tuple[int, ...]
) -> None:
    output = result.stdout + result.stderr
    assert result.returncode in codes, output
    assert "Traceback" not in output, output
    assert SECRET not in output, output
    lines = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1, output


@pytest.mark.parametrize(
    ("args", "code", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_arguments_give_one_clear_line(
    project: Path, args: list[str], code: int, fragment: str
) -> None:
    result = rabbitflow(project, *args)
    assert_one_clear_error(result, (code,))
    assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("args", [c[1] for c in URL_CASES], ids=[c[0] for c in URL_CASES])
def test_bad_urls_give_one_clear_line(project: Path, args: list[str]) -> None:
    try:
        result = rabbitflow(project, *args, timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("the command retried a URL it should have refused")
    assert_one_clear_error(result, (1, 2))


def test_debug_shows_the_traceback(project: Path) -> None:
    result = rabbitflow(project, "--debug", "topology", "validate", "bad.toml")
    assert result.returncode == 1
    assert "Traceback" in result.stderr


@pytest.fixture
def refused_url(rabbit: Rabbit, vhost: str, vhost_url: str, project: Path) -> Iterator[str]:
    """A URL of the test's vhost, where the topology is declared and jobs.dlq holds a
    message, for a user with no permission at all on it."""
    declared = rabbitflow(project, "topology", "declare", "--url", vhost_url)
    assert declared.returncode == 0, declared.stderr
    parked = rabbitflow(project, "publish", "", "jobs.dlq", "{}", "--url", vhost_url)
    assert parked.returncode == 0, parked.stderr
    user = f"rf-refused-{uuid.uuid4().hex[:8]}"
    rabbit.admin.add_user(user, SECRET)
    try:
        rabbit.admin.set_permissions(vhost, user, "", "", "")
        parts = urlsplit(rabbit.vhost_url(vhost))
        yield urlunsplit(parts._replace(netloc=f"{user}:{SECRET}@{parts.hostname}:{parts.port}"))
    finally:
        rabbit.forget_user(user)


REFUSED: list[tuple[str, list[str], str]] = [
    ("dlq list", ["dlq", "list", "jobs"], "ACCESS_REFUSED"),
    ("dlq purge", ["dlq", "purge", "jobs", "--yes"], "ACCESS_REFUSED"),
    ("dlq replay", ["dlq", "replay", "jobs"], "ACCESS_REFUSED"),
    ("publish", ["publish", "", "jobs", "{}"], "ACCESS_REFUSED"),
    ("declare", ["topology", "declare"], "configure permission"),
]


@pytest.mark.broker
@pytest.mark.parametrize(
    ("args", "fragment"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_broker_refusals_are_one_clear_line(
    project: Path, refused_url: str, args: list[str], fragment: str
) -> None:
    result = rabbitflow(project, *args, "--url", refused_url)
    assert_one_clear_error(result, (1,))
    assert fragment in result.stderr, result.stderr
    assert "<" not in result.stderr, f"a client repr: {result.stderr}"
