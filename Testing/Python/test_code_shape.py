"""Shape rules of TSKDLib's code (issue 14): no function longer than 80 lines.

A long function is where several concepts hide in one place (the three hand-written training loops
of 200+ lines before the engine). Read with ``ast`` only; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 80


def long_functions(package: Path, limit: int = MAX_LINES) -> list[str]:
    """``"file:function:lines"`` for every function or method of ``package`` longer than ``limit``
    lines (decorators excluded, docstring included)."""
    out = []
    for f in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{f.relative_to(package.parent)}:{node.name}:{n}")
    return out


def test_no_function_in_tskdlib_is_longer_than_80_lines():
    assert long_functions(ROOT / "TSKDLib") == []


def test_the_rule_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path / "pkg") == ["pkg/m.py:long:81"]
