"""The documentation cannot rot: every code sample runs, every command exists, every link resolves.

What each fenced block of ``docs/*.md``, ``README.md`` and ``examples/*/README.md`` gets:

- ```` ```python ````: run as a script (``python block.py``) in a temporary directory, or with
  pytest when it defines ``test_*`` functions. A block whose first line is ``# NAME.py`` (or
  ``# NAME.toml``...) is also a file: it is written into the directory of every later block of
  the same page, so a page can build ``topology.toml`` and ``app.py``, then test them.
- ```` ```toml ````: validated with ``rabbitflow.topology.parse_topology``.
- ```` ```json ````: parsed (one document, or one per line).
- shell blocks (``sh``, ``bash``, ``console``, unlabelled): every ``rabbitflow ...`` command
  (``$ rabbitflow ...`` in blocks that mix commands and output) must name an existing
  subcommand with existing options; so must inline code spans such as `` `rabbitflow run` ``.

An HTML comment on the line before a block changes what happens to it:

- ``<!-- test: skip REASON -->``: not run (the reason is required);
- ``<!-- test: fragment -->``: a piece of a larger program: Python is only compiled and its
  ``rabbitflow`` imports resolved; TOML only parsed;
- ``<!-- test: topology -->`` / ``<!-- test: topology in [defaults] -->``: a topology file, or
  keys of one of its tables;
- ``<!-- test: file NAME -->``: the block is the file NAME (like a ``# NAME`` first line);
- ``<!-- test: broker -->``: run against the real RabbitMQ, on a fresh vhost where the page's
  ``topology.toml`` is declared (``RABBITFLOW_URL`` points there); skipped without a broker,
  a failure in CI;
- ``<!-- test: console -->``: ``$ rabbitflow ...`` lines are run (offline commands only) and
  the lines after each must be exactly its output;
- ``<!-- test: output rabbitflow ... -->``: the block is exactly that command's output.

Pages owned elsewhere that have no markers yet get theirs from ``MARKERS`` below.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import click
import pytest
from aio_pika.abc import AbstractConnection
from click.testing import CliRunner

from rabbitflow import dlq
from rabbitflow.connection import connect
from rabbitflow.errors import AccessRefusedError, TopologyError
from rabbitflow.topology import derive, load_topology, parse_topology
from rabbitflow.topology._declare import declare, verify
from tests.support.broker import Rabbit, version_of

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(
    [*DOCS.glob("*.md"), ROOT / "README.md", *ROOT.glob("examples/*/README.md")],
    key=lambda p: str(p),
)
SHELL = {"sh", "bash", "shell", "console", "text", ""}
SCRIPT_TIMEOUT = 60

# Markers for blocks of pages this test does not own: (page, start of the block's first line)
# -> marker.
# An inline `<!-- test: ... -->` before the block takes precedence; an entry that matches no
# block any more fails `test_every_marker_entry_still_matches_a_block`.
MARKERS: dict[tuple[str, str], str] = {
    ("docs/dlq.md", "from rabbitflow import dlq"): (
        "fragment: top-level await on a broker whose DLQ has messages"
    ),
    ("docs/observability.md", "# demo.py, before or after the App"): (
        "fragment: added to demo.py above"
    ),
    ("docs/recoverability.md", '@app.consumer("billing.order-created", retry_on=('): (
        "fragment: app, httpx and OrderCreated come from the surrounding text"
    ),
    ("docs/recoverability.md", "except RateLimited as exc:"): (
        "skip: the except clause of a try statement the text describes"
    ),
    ("docs/recoverability.md", 'retry = { delays = ["1s", "10s", "1m"], max_attempts = 5 }'): (
        "topology in [defaults]"
    ),
    ("docs/running.md", '@app.consumer("billing.order-created")'): (
        "fragment: a handler's signature"
    ),
    ("docs/running.md", "@contextlib.asynccontextmanager"): (
        "fragment: create_pool is the reader's own"
    ),
    ("docs/running.md", "message_id = await app.publish("): (
        "fragment: top-level await, OrderCreated and request_id from the text"
    ),
}

# Pages other people are writing: links to them may dangle until they land.
PENDING_PAGES: set[str] = set()


# -- reading pages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its info string, its text and its test marker."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")

    @property
    def filename(self) -> str | None:
        """``NAME`` of a ``<!-- test: file NAME -->`` marker or a ``# NAME.ext`` first line."""
        if self.marker and self.marker.startswith("file "):
            return self.marker.split(None, 1)[1].strip()
        match = re.fullmatch(r"#\s*([\w.-]+\.(?:py|toml))", self.first_line)
        return match.group(1) if match else None

    @property
    def mode(self) -> str:
        """The first word of the marker, or what the language implies."""
        if self.marker:
            return self.marker.split(None, 1)[0].rstrip(":")
        return "run"


@dataclass
class Page:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line, text) outside blocks
    problems: list[str] = field(default_factory=list)


FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<marker>.*?)\s*-->\s*$")


def read_page(path: Path) -> Page:
    page = Page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    previous = ""  # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            page.prose.append((i + 1, lines[i]))
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = i + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        if end == len(lines):
            page.problems.append(f"{_rel(path)}:{i + 1}: code fence {fence} is never closed")
        body = "\n".join(
            line[indent:] if not line[:indent].strip() else line for line in lines[i + 1 : end]
        )
        marker = MARKER.match(previous)
        lang = opening["info"].strip().split(" ")[0].lower()
        block = Block(path, i + 1, lang, body + "\n", marker["marker"] if marker else None)
        if block.marker is None:
            block = Block(path, block.line, lang, block.code, _known_marker(block))
        page.blocks.append(block)
        previous = ""
        i = end + 1
    return page


def _known_marker(block: Block) -> str | None:
    page = _rel(block.page)
    return next(
        (marker for (p, start), marker in MARKERS.items() if p == page and _starts(block, start)),
        None,
    )


def _starts(block: Block, start: str) -> bool:
    return block.first_line.startswith(start)


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0])


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


READ = {path: read_page(path) for path in PAGES}
BLOCKS = [block for page in READ.values() for block in page.blocks]
CODE = [b for b in BLOCKS if b.lang in ("python", "py", "toml", "json") and b.mode != "output"]


def test_pages_parse() -> None:
    problems = [problem for page in READ.values() for problem in page.problems]
    assert not problems, "\n".join(problems)


def test_every_marker_entry_still_matches_a_block() -> None:
    stale = [
        f"{page}: {start!r}"
        for page, start in MARKERS
        if not any(_rel(b.page) == page and _starts(b, start) for b in BLOCKS)
    ]
    assert not stale, "MARKERS entries that match no block (remove them):\n" + "\n".join(stale)


def test_markers_are_known() -> None:
    modes = {"run", "skip", "fragment", "topology", "file", "console", "output", "pytest", "broker"}
    bad = [f"{b.where}: <!-- test: {b.marker} -->" for b in BLOCKS if b.mode not in modes]
    bad += [f"{b.where}: skip needs a reason" for b in BLOCKS if b.marker == "skip"]
    assert not bad, "unknown test markers:\n" + "\n".join(bad)


# -- running code blocks ---------------------------------------------------------------------


@pytest.mark.parametrize("block", CODE, ids=[b.where for b in CODE])
def test_code_sample(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if block.mode == "skip":
        pytest.skip(f"{block.where}: {block.marker}")
    for earlier in READ[block.page].blocks:
        if earlier.line >= block.line:
            break
        if earlier.filename and earlier.mode != "skip":
            (tmp_path / earlier.filename).write_text(earlier.code, encoding="utf-8")
    if block.lang == "toml":
        check_toml(block)
    elif block.lang == "json":
        check_json(block)
    elif block.mode == "fragment":
        check_fragment(block)
    elif block.mode == "broker":
        with broker_vhost(request.getfixturevalue("rabbit"), tmp_path) as url:
            run_python(block, tmp_path, {"RABBITFLOW_URL": url})
    else:
        run_python(block, tmp_path)


def check_toml(block: Block) -> None:
    text = block.code
    if block.marker and block.marker.startswith("topology in "):
        table = block.marker.removeprefix("topology in ").strip()
        text = f"{table}\n{text}"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{block.where}: not valid TOML: {exc}", pytrace=False)
    if block.mode == "fragment" or "topology" not in (block.filename or "topology"):
        return  # a fragment, or another TOML file (pyproject.toml...)
    try:
        parse_topology(text, source=block.where)
    except TopologyError as exc:
        pytest.fail(f"{block.where}: not a valid topology:\n{exc}", pytrace=False)


def check_json(block: Block) -> None:
    try:
        json.loads(block.code)
        return
    except json.JSONDecodeError:
        pass
    for n, line in enumerate(block.code.splitlines(), start=block.line + 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                pytest.fail(f"{_rel(block.page)}:{n}: not JSON: {exc}", pytrace=False)


def check_fragment(block: Block) -> None:
    """Compile a fragment (top-level await allowed) and resolve its rabbitflow imports."""
    source = "\n" * block.line + block.code
    try:
        tree = compile(
            source,
            str(block.page),
            "exec",
            flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
    except SyntaxError as exc:
        pytest.fail(f"{_rel(block.page)}:{exc.lineno}: {exc.msg}", pytrace=False)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rabbitflow"):
            module = importlib.import_module(node.module or "")
            missing = [a.name for a in node.names if not _importable(module, a.name)]
            assert not missing, f"{_rel(block.page)}:{node.lineno}: {node.module} has no {missing}"


def _importable(module: object, name: str) -> bool:
    if hasattr(module, name):
        return True
    try:
        importlib.import_module(f"{module.__name__}.{name}")  # type: ignore[attr-defined]
    except ImportError:
        return False
    return True


def is_test_module(block: Block) -> bool:
    if block.mode == "pytest" or (block.filename or "").startswith("test_"):
        return True
    tree = ast.parse(block.code)
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
        for node in tree.body
    )


@contextlib.contextmanager
def broker_vhost(rabbit: Rabbit, directory: Path) -> Iterator[str]:
    """A fresh vhost on the real broker with ``directory/topology.toml`` declared; its URL."""
    with rabbit.vhost("rf-docs") as vhost:
        url = rabbit.vhost_url(vhost)
        topology = directory / "topology.toml"
        if topology.exists():
            asyncio.run(_declare(url, topology))
        yield url


async def _declare(url: str, path: Path) -> None:
    connection = await connect(url)
    async with connection:
        await declare(connection, derive(load_topology(path)))


def run_python(block: Block, directory: Path, extra_env: dict[str, str] | None = None) -> None:
    """Run the block in ``directory``: as a script, or with pytest for a test module.

    The file is padded with blank lines so that line numbers in a traceback are the page's."""
    name = block.filename or f"sample_{block.line}.py"
    if is_test_module(block) and not name.startswith("test_"):
        name = f"test_sample_{block.line}.py"
    script = directory / name
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    if is_test_module(block):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name]
    else:
        command = [sys.executable, name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("RABBITFLOW_URL", None)
    env.update(extra_env or {})
    result = subprocess.run(
        command,
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).replace(str(script), str(block.page))
        pytest.fail(
            f"{block.where}: the {block.lang} block failed (exit {result.returncode}; line "
            f"numbers below are the page's):\n{_tail(output)}",
            pytrace=False,
        )


def _tail(text: str, lines: int = 60) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept)


# -- console blocks: commands and their exact output ----------------------------------------


CONSOLE = [b for b in BLOCKS if b.mode in ("console", "output")]


@pytest.mark.parametrize("block", CONSOLE, ids=[b.where for b in CONSOLE])
def test_console_output(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for earlier in READ[block.page].blocks:
        if earlier.line < block.line and earlier.filename:
            (tmp_path / earlier.filename).write_text(earlier.code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for command, expected in console_steps(block):
        args = shlex.split(command)
        assert args[0] == "rabbitflow", f"{block.where}: only rabbitflow commands run: {command}"
        result = CliRunner().invoke(load_cli(), args[1:], prog_name="rabbitflow")
        got = [line.rstrip() for line in result.output.rstrip().splitlines()]
        assert got == expected, f"{block.where}: `{command}` printed:\n{result.output}"


def console_steps(block: Block) -> Iterator[tuple[str, list[str]]]:
    """(command, expected output lines) of a console block, or of an ``output`` block."""
    if block.mode == "output":
        shown = (block.marker or "").removeprefix("output").strip()
        yield shown, [line.rstrip() for line in block.code.rstrip().splitlines()]
        return
    command: str | None = None
    expected: list[str] = []
    for line in block.code.rstrip().splitlines():
        if line.startswith("$ "):
            if command is not None:
                yield command, expected
            command, expected = line[2:], []
        else:
            expected.append(line.rstrip())
    if command is not None:
        yield command, expected


# -- shell commands: the rabbitflow commands the docs show exist -------------------------


def load_cli() -> click.Group:
    from rabbitflow import cli

    cli._register()
    return cli.cli


@dataclass(frozen=True)
class Command:
    where: str
    text: str


def shell_commands() -> Iterator[Command]:
    """``rabbitflow ...`` in shell blocks, ``$ rabbitflow ...`` lines and inline code."""
    for block in BLOCKS:
        if block.lang not in SHELL:
            continue
        lines = block.code.replace("\\\n", " ").splitlines()
        for n, line in enumerate(lines, start=block.line + 1):
            text = line.strip()
            if text.startswith("$ "):
                text = text[2:]
            elif block.lang not in ("sh", "bash", "shell") and not text.startswith("rabbitflow "):
                continue
            yield from (
                Command(f"{_rel(block.page)}:{n}", segment) for segment in _rabbitflow_in(text)
            )
    for page in READ.values():
        for n, line in page.prose:
            for span in re.findall(r"`(rabbitflow [^`]+)`", line):
                yield Command(f"{_rel(page.path)}:{n}", span)


def _rabbitflow_in(line: str) -> Iterator[str]:
    """The rabbitflow invocations of a shell line (``a && b | c``, env assignments...)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        tokens = line.split()
    segment: list[str] = []
    for token in [*tokens, "&&"]:
        if token in ("&&", "||", "|", ";"):
            while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", segment[0]):
                segment.pop(0)
            if segment and Path(segment[0]).name == "rabbitflow":
                yield shlex.join(["rabbitflow", *segment[1:]])
            segment = []
        else:
            segment.append(token)


def check_command(cli: click.Group, text: str) -> list[str]:
    """Problems of one command line: unknown subcommands or options (synopses allowed)."""
    tokens = [t.strip("[]()") for t in shlex.split(text)[1:]]
    # Contexts made as click makes them: a help option is cached on the command object.
    return _check(cli, click.Context(cli, info_name="rabbitflow", **cli.context_settings), tokens)


def _check(command: click.Command, ctx: click.Context, tokens: list[str]) -> list[str]:
    if isinstance(command, click.Group):
        options, rest = _leading_options(tokens)
        problems = _unknown_options(command, ctx, options)
        if not rest or rest[0] in ("...", "COMMAND"):
            return problems
        for name in rest[0].split("|"):
            sub = command.get_command(ctx, name)
            if sub is None:
                known = ", ".join(sorted(command.list_commands(ctx)))
                problems.append(f"`{ctx.command_path}` has no command {name!r} ({known})")
                continue
            child = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
            problems += _check(sub, child, rest[1:])
        return problems
    options = []
    for token in tokens:
        if token in ("--", "<", ">", "2>", "2>&1") or token.startswith((">", "<")):
            break
        if token.startswith("-") and token != "-" and token != "...":
            options.append(token.split("=", 1)[0])
    return _unknown_options(command, ctx, options)


def _leading_options(tokens: list[str]) -> tuple[list[str], list[str]]:
    i = 0
    while i < len(tokens) and tokens[i].startswith("-"):
        i += 1
    return tokens[:i], tokens[i:]


def _unknown_options(command: click.Command, ctx: click.Context, options: list[str]) -> list[str]:
    known = {"-h", "--help"}
    for param in command.get_params(ctx):
        known.update(param.opts, param.secondary_opts)
    return [
        f"`{ctx.command_path}` has no option {option!r}"
        for option in options
        if option.split("|")[0] not in known
    ]


def test_shell_commands_exist() -> None:
    cli = load_cli()
    commands = list(shell_commands())
    assert len(commands) > 20  # the scan finds the commands the docs show
    problems = [
        f"{command.where}: {problem}  [{command.text}]"
        for command in commands
        for problem in check_command(cli, command.text)
    ]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_mistakes() -> None:
    cli = load_cli()
    assert check_command(cli, "rabbitflow topology validate|plan [FILE]") == []
    assert check_command(cli, "rabbitflow --debug run app:app --workers 2 --no-declare") == []
    assert check_command(cli, "rabbitflow dlq replay Q --error-type X --dry-run") == []
    assert check_command(cli, "rabbitflow topology declar") != []
    assert check_command(cli, "rabbitflow run app:app --worker 2") != []
    assert list(_rabbitflow_in("A=1 rabbitflow publish x y '{}' -H k=v | jq .")) == [
        "rabbitflow publish x y '{}' -H k=v"
    ]


# -- links -----------------------------------------------------------------------------------

LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(?P<target>\S+)")


def links(page: Page) -> Iterator[tuple[int, str]]:
    for n, line in page.prose:
        text = re.sub(r"`[^`]*`", "", line)  # links inside inline code are not links
        for match in LINK.finditer(text):
            yield n, match["target"].strip("<>")
        reference = REFERENCE.match(text)
        if reference:
            yield n, reference["target"]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a page (and explicit ``<a id>``/``name`` anchors)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in READ[path].prose if path in READ else read_page(path).prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading[1])
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def _slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_resolve() -> None:
    problems = []
    for page in READ.values():
        for n, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:...
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.path.parent / path_part).resolve() if path_part else page.path
            where = f"{_rel(page.path)}:{n}"
            if not resolved.exists():
                if _rel_or_none(resolved) in PENDING_PAGES:
                    continue
                problems.append(f"{where}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: {target}: no heading with anchor #{anchor}")
    assert not problems, "\n".join(problems)


def _rel_or_none(path: Path) -> str | None:
    try:
        return _rel(path)
    except ValueError:
        return None


def test_the_anchor_slugs_are_githubs() -> None:
    assert _slug("`--workers N`") == "--workers-n"
    assert _slug("`--no-declare`: least-privilege users") == "--no-declare-least-privilege-users"
    assert _slug("1. Inspect: `rabbitflow dlq list`") == "1-inspect-rabbitflow-dlq-list"
    assert _slug("Changing a queue's arguments safely") == "changing-a-queues-arguments-safely"


def test_index_lists_every_page() -> None:
    index = READ[DOCS / "index.md"]
    linked = {target.partition("#")[0] for _, target in links(index)}
    missing = [
        p.name for p in sorted(DOCS.glob("*.md")) if p.name != "index.md" and p.name not in linked
    ]
    missing += [p for p in sorted(PENDING_PAGES) if Path(p).name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


def test_readme_links_the_quickstart() -> None:
    assert "docs/quickstart.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# -- the generated CLI reference -------------------------------------------------------------


def test_cli_reference_is_up_to_date() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_cli_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    expected = gen_cli_docs.render()
    current = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert current == expected, (
        "docs/cli.md is out of date with the click commands: run python scripts/gen_cli_docs.py"
    )


def test_cli_reference_covers_every_command() -> None:
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    for path in ("rabbitflow run", "rabbitflow topology declare", "rabbitflow dlq replay"):
        assert f"## {path}\n" in page


# -- operations.md: the least-privilege users work on a real broker ---------------------------


Grants = dict[str, tuple[str, str, str]]  # role -> (configure, write, read)


def permission_grants() -> Grants:
    """The ``rabbitmqctl set_permissions -p orders orders-ROLE C W R`` lines of operations.md."""
    grants: Grants = {}
    page = READ[DOCS / "operations.md"]
    for block in page.blocks:
        for line in block.code.splitlines():
            if not line.startswith("rabbitmqctl set_permissions"):
                continue
            words = shlex.split(line, comments=True)
            if words[:2] == ["rabbitmqctl", "set_permissions"]:
                vhost, user, configure, write, read = words[3:]
                assert (words[2], vhost) == ("-p", "orders"), line
                grants[user.removeprefix("orders-")] = (configure, write, read)
    return grants


@contextlib.contextmanager
def users(rabbit: Rabbit, vhost: str, grants: Grants) -> Iterator[dict[str, str]]:
    """A throw-away user per role with the page's permissions on ``vhost``; role -> AMQP URL."""
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"rf-docs-{role}-{suffix}" for role in grants}
    passwords = {role: uuid.uuid4().hex for role in grants}
    base = urlsplit(rabbit.vhost_url(vhost))

    def create(role: str) -> None:
        rabbit.admin.add_user(names[role], passwords[role])
        rabbit.admin.set_permissions(vhost, names[role], *grants[role])

    def delete(name: str) -> None:
        with contextlib.suppress(RuntimeError):
            rabbit.admin.delete_user(name)

    def url(role: str) -> str:
        netloc = f"{names[role]}:{passwords[role]}@{base.hostname}:{base.port or 5672}"
        return urlunsplit(base._replace(netloc=netloc))

    # rabbitmqctl (without the management API) takes a second a call: side by side.
    with ThreadPoolExecutor(len(grants)) as pool:
        try:
            list(pool.map(create, grants))
            yield {role: url(role) for role in grants}
        finally:
            list(pool.map(delete, names.values()))


@pytest.mark.broker
def test_the_users_of_operations_md_have_exactly_the_rights_they_need(rabbit: Rabbit) -> None:
    grants = permission_grants()
    assert set(grants) == {"deployer", "app", "producer", "oncall"}
    with rabbit.vhost("rf-docs-perms") as vhost, users(rabbit, vhost, grants) as urls:
        asyncio.run(_exercise(urls))


async def _exercise(urls: dict[str, str]) -> None:
    declarations = derive(load_topology(ROOT / "topology.toml"))
    work = [q.name for q in declarations.queues if q.role == "work"]
    # The deployer declares everything.
    async with await connect(urls["deployer"]) as connection:
        await declare(connection, declarations)
    # The worker's user: the --no-declare check, consuming, retries, dead letters, events.
    async with await connect(urls["app"]) as connection:
        unchecked = await verify(connection, declarations)
        # From 4.3 a passive declare needs a permission on the object: the tiers, DLQs and
        # exchanges the app user has no right on are left unchecked (and logged).
        version = version_of(connection)
        hidden = "queue 'billing.order-created.dlq'" in unchecked
        assert hidden is version.at_least(4, 3), unchecked
        assert not any(f"queue {q!r}" in unchecked for q in work)
        for queue in work:
            await _get(connection, queue)
        await _publish(connection, "", "billing.order-created.retry.5s")
        await _publish(connection, "dlx", "billing.order-created")
        await _publish(connection, "orders", "order.paid")
        await _refused(declare(connection, declarations))
        await _refused(_get(connection, "billing.order-created.dlq"))
    # A producer publishes order events and nothing else.
    async with await connect(urls["producer"]) as connection:
        await _publish(connection, "orders", "order.created")
        await _refused(_publish(connection, "dlx", "billing.order-created"))
        await _refused(_get(connection, "billing.order-created"))
    # The on-call operator works the DLQ and cannot touch work queues.
    async with await connect(urls["oncall"]) as connection:
        assert (await dlq.peek(connection, "billing.order-created")).count == 1
        assert (await dlq.replay(connection, "billing.order-created")).moved == 1
        await dlq.purge(connection, "billing.order-created")
        await _refused(_get(connection, "billing.order-created"))
        await _refused(_publish(connection, "orders", "order.created"))


async def _get(connection: AbstractConnection, queue: str) -> None:
    async with connection.channel() as channel:
        target = await channel.get_queue(queue, ensure=False)
        message = await target.get(fail=False)
        if message is not None:
            await message.nack(requeue=True)


async def _publish(connection: AbstractConnection, exchange: str, routing_key: str) -> None:
    async with connection.channel(publisher_confirms=True) as channel:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        message = aio_pika.Message(b"{}", content_type="application/json")
        await target.publish(message, routing_key, mandatory=True)


async def _refused(operation: Awaitable[object]) -> None:
    with pytest.raises((aiormq.exceptions.ChannelAccessRefused, AccessRefusedError)):
        await operation
