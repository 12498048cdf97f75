"""The import graph of TSKDLib (and TSKDSlicerLib) has no cycle (issue 14).

Every ``import`` statement counts, at module level and inside functions alike: a deferred import
hides a cycle from the interpreter but not from a reader, and moving modules into subpackages
turns it into an error. Read with ``ast`` only; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"TSKDLib": ROOT, "TSKDSlicerLib": ROOT / "TSKDSlicer"}


def _modules(package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` for every .py file of ``package``."""
    base = PACKAGES[package]
    out = {}
    for f in sorted((base / package).rglob("*.py")):
        parts = list(f.relative_to(base).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _owner(name: str, modules) -> str | None:
    """The module of ``modules`` that ``import name`` runs last (``a.b.c`` -> ``a.b`` when c is an
    attribute), None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` within ``package``, from every import statement."""
    modules = _modules(package)
    graph = {}
    for name, (path, is_pkg) in modules.items():
        here = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_owner(a.name, modules) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = here
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets.update(_owner(f"{base}.{a.name}", modules) for a in node.names)
        graph[name] = {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_reads_relative_and_deferred_imports():
    graph = import_graph("TSKDLib")
    assert "TSKDLib.errors" in graph["TSKDLib.cli.main"]  # from .errors import ...
    assert "TSKDLib.cli.pipeline_cli" in graph["TSKDLib.cli.main"]  # deferred, inside build_parser
    assert "TSKDLib.teacher.training" in graph["TSKDLib.teacher"]  # absolute import in a package


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
