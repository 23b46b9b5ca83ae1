"""The layout docs/architecture.md describes stays true: rooms of a readable size, imports one way.

Read from the source with ``ast`` (nothing is imported): module, class and function sizes;
no import cycle inside sync/; no module reaching for another module's private names; the
command line and the daemon at the top, imported by their entry points only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SYNC = Path(__file__).resolve().parents[2] / "sync"
# A separate program (stands in for the platform), standard library only.
SEPARATE = {"sync.upstream.simulator"}
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 100
# Who may import the top rooms.
TOP = {"sync.cli": {"sync.__main__"}, "sync.daemon": {"sync.cli"}}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(SYNC.rglob("*.py")):
        parts = path.relative_to(SYNC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _imports(name: str) -> Iterator[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import of sync's own modules."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sync"):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("sync"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, None, node.lineno
                else:
                    yield base, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in _imports(name) if target in MODULES} for name in MODULES}


def _span(node: ast.AST) -> int:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])  # type: ignore[attr-defined]
    return int(node.end_lineno) - first + 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(set(MODULES) - SEPARATE))
def test_rooms_classes_and_functions_stay_readable(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines: split it along its jobs"
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.ClassDef):
            assert _span(node) <= MAX_CLASS_LINES, f"class {name}.{node.name} has {_span(node)} lines"
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert _span(node) <= MAX_FUNCTION_LINES, f"function {name}.{node.name} has {_span(node)} lines"


def test_no_import_cycle_inside_sync() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_takes_another_modules_private_names() -> None:
    taken = [
        f"{MODULES[name].relative_to(SYNC.parent)}:{line}: {target}.{taken_name}"
        for name in MODULES
        for target, taken_name, line in _imports(name)
        if taken_name is not None and taken_name.startswith("_") and not taken_name.startswith("__")
    ]
    assert not taken, "give what two rooms share a public name in the lower one:\n" + "\n".join(taken)


def test_the_command_line_and_the_daemon_are_imported_by_their_entry_points_only() -> None:
    graph = _graph()
    for top, allowed in TOP.items():
        importers = {name for name, targets in graph.items() if top in targets}
        assert importers <= allowed, f"{top} is imported by {sorted(importers - allowed)}"


def test_the_simulator_needs_nothing_of_ours() -> None:
    assert not _graph()["sync.upstream.simulator"], "the simulator must stay a program of the standard library"
