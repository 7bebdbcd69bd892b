"""The package's shape (docs/architecture.md): no import circles, and the core never imports a
feature package.

The import graph is read from the source with ``ast``; nothing is imported or run. An edge is an
``import`` or ``from ... import`` anywhere in a module (a function's lazy import counts: it runs
too), to the module it names. The implicit import of a parent package is left out: every
``from rabbitflow.x import y`` runs ``rabbitflow/__init__.py`` first, which would put every module
in one circle and hide the real ones.

Imports under ``if TYPE_CHECKING:`` are left out of the circle check: they never run (every
module has ``from __future__ import annotations``), so they cannot make the import order matter,
and mypy reads circular annotations fine. They do count as upward imports: a core module that
names a feature's type depends on that feature all the same.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rabbitflow"

#: Packages that build on the core; new ones are listed before they exist, so the first upward
#: import of one fails at once.
FEATURES = (
    "asgi",
    "cli",
    "console",
    "idempotency",
    "jobs",
    "migrate",
    "outbox",
    "testing",
    "workflows",
)

#: The core's imports of features that exist today, each with its reason. Removing one is
#: welcome (then delete its line); adding one needs a reason as good.
ALLOWED_UPWARD = {
    # `python -m rabbitflow` is the command line: this module is the CLI's entry point.
    ("rabbitflow.__main__", "rabbitflow.cli"): "python -m rabbitflow runs the CLI",
    # The idempotency guard wraps the handler inside the delivery path (an entry in progress
    # requeues the message, a finished one skips the handler), and App takes the store as
    # ``App(idempotency=...)``. To reverse: the guard registered as handler middleware.
    ("rabbitflow.app", "rabbitflow.idempotency._guard"): "App builds each queue's guard",
    ("rabbitflow.app", "rabbitflow.idempotency._store"): "App(idempotency=store)",
    ("rabbitflow._consumers", "rabbitflow.idempotency._guard"): "one guard per consumer",
    ("rabbitflow._dispatch", "rabbitflow.idempotency._guard"): "the guard around the handler",
    # `from rabbitflow import chain, chord, group, step` (contract section 14): the public
    # names, imported on first use; the delivery path itself sees only the hook it defines
    # (rabbitflow._continuation), which rabbitflow.workflows installs.
    ("rabbitflow", "rabbitflow.workflows"): "the public names chain, chord, group, step",
    # Typing only: ``App(outbox=PostgresOutbox(...))`` and ``app.outbox.publish`` typed for
    # the user's mypy; the core never imports the outbox at run time (the relay is started
    # through the object the user gave).
    ("rabbitflow.app", "rabbitflow.outbox"): "App(outbox=...) is typed",
}


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    line: int
    typing_only: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root: Path) -> dict[str, tuple[str, bool]]:
    """Every module of the package under ``root``: its source and whether it is a package."""
    return {
        module_name(path, root): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted(root.rglob("*.py"))
    }


def import_graph(modules: Mapping[str, tuple[str, bool]]) -> list[Edge]:
    """The imports between ``modules`` (name → source, is a package)."""
    edges: list[Edge] = []
    for name, (source, is_package) in modules.items():
        base = name if is_package else name.rpartition(".")[0]
        for target, line, typing_only in _imports(ast.parse(source), base):
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != name:
                edges.append(Edge(name, resolved, line, typing_only))
    return edges


def _resolve(target: str, modules: Mapping[str, object]) -> str | None:
    # `from rabbitflow import dlq` names a module, `from rabbitflow.dlq import peek` a name
    # in one: the longest prefix that is a module.
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _imports(tree: ast.AST, base: str) -> Iterator[tuple[str, int, bool]]:
    yield from _walk(tree, base, typing_only=False)


def _walk(node: ast.AST, base: str, *, typing_only: bool) -> Iterator[tuple[str, int, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for inner in child.body:
                yield from _one(inner, base, typing_only=True)
            for inner in child.orelse:
                yield from _one(inner, base, typing_only=typing_only)
        else:
            yield from _one(child, base, typing_only=typing_only)


def _one(node: ast.AST, base: str, *, typing_only: bool) -> Iterator[tuple[str, int, bool]]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, node.lineno, typing_only
    elif isinstance(node, ast.ImportFrom):
        module = _absolute(node, base)
        for alias in node.names:
            yield f"{module}.{alias.name}", node.lineno, typing_only
    else:
        yield from _walk(node, base, typing_only=typing_only)


def _absolute(node: ast.ImportFrom, base: str) -> str:
    if not node.level:
        return node.module or ""
    parts = base.split(".")
    parts = parts[: len(parts) - node.level + 1]
    return ".".join([*parts, *([node.module] if node.module else [])])


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The import circles among runtime edges (strongly connected components, Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if not edge.typing_only:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    return _components(graph)


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_feature(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] in FEATURES


def is_core(module: str, modules: Mapping[str, tuple[str, bool]]) -> bool:
    """``rabbitflow/*.py``, ``rabbitflow/topology/`` and the private packages
    (``rabbitflow/_schedule/``, ``rabbitflow/_streams/``)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "topology" or parts[1].startswith("_"):
        return True
    return len(parts) == 2 and not modules[module][1]


def upward(edges: list[Edge], modules: Mapping[str, tuple[str, bool]]) -> set[tuple[str, str]]:
    """The core's imports of feature packages, typing-only ones included."""
    return {
        (edge.source, edge.target)
        for edge in edges
        if is_core(edge.source, modules) and is_feature(edge.target)
    }


@pytest.fixture(scope="module")
def modules() -> dict[str, tuple[str, bool]]:
    return read_package(PACKAGE)


def test_no_module_imports_itself_back(modules: dict[str, tuple[str, bool]]) -> None:
    # Given rabbitflow's source, when its runtime imports are followed,
    # then no chain of them comes back to where it started.
    assert cycles(import_graph(modules)) == []


def test_the_core_imports_no_feature_package(modules: dict[str, tuple[str, bool]]) -> None:
    found = upward(import_graph(modules), modules)
    unexplained = sorted(found - ALLOWED_UPWARD.keys())
    assert not unexplained, (
        "the core imports a feature package (features import the core, never the reverse; "
        f"docs/architecture.md): {unexplained}"
    )
    stale = sorted(ALLOWED_UPWARD.keys() - found)
    assert not stale, f"these imports are gone: remove them from ALLOWED_UPWARD: {stale}"


# -- the checks themselves, on a made-up package ----------------------------------------------


def fake(**sources: str) -> dict[str, tuple[str, bool]]:
    """Modules named with ``__`` for dots; a name ending in ``__init`` is a package."""
    made = {}
    for key, source in sources.items():
        name = key.replace("__", ".")
        is_package = name.endswith(".init")
        made[name.removesuffix(".init")] = (source, is_package)
    return made


def test_a_new_upward_import_is_found_even_lazy_or_typing_only() -> None:
    package = fake(
        rabbitflow__init="",
        rabbitflow__app="def f():\n    from rabbitflow.outbox import relay\n",
        rabbitflow__topology__init="",
        rabbitflow__topology___declare=(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from rabbitflow.console._state import Console\n"
        ),
        rabbitflow__outbox__init="",
        rabbitflow__outbox__relay="from rabbitflow import app\n",
        rabbitflow__console__init="",
        rabbitflow__console___state="from .. import app\n",
    )
    assert upward(import_graph(package), package) == {
        ("rabbitflow.app", "rabbitflow.outbox.relay"),
        ("rabbitflow.topology._declare", "rabbitflow.console._state"),
    }


def test_a_circle_is_found_but_not_through_type_checking_imports() -> None:
    package = fake(
        rabbitflow__init="",
        rabbitflow__a="from rabbitflow.b import x\nimport rabbitflow.e\n",
        rabbitflow__b="import rabbitflow.c\n",
        rabbitflow__c="from . import a\n",
        rabbitflow__d="if TYPE_CHECKING:\n    import rabbitflow.a\n",
        rabbitflow__e="import rabbitflow.d\n",
    )
    assert cycles(import_graph(package)) == [["rabbitflow.a", "rabbitflow.b", "rabbitflow.c"]]
