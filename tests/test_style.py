"""Checks of the style guide that a machine can make: functions short enough to read on a screen,
and the trainer kept free of how forward passes run."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minirlhf"
MAX_FUNCTION_LINES = 50


def long_functions(root: Path, limit: int) -> list[str]:
    """`file:function (lines)` for every function or method longer than `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.name} ({lines})")
    return found


def test_no_function_is_longer_than_fifty_lines():
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES) == []


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text(f"def long():\n{body}\n")
    assert long_functions(tmp_path / "pkg", MAX_FUNCTION_LINES) == ["pkg/long.py:long (51)"]


def test_the_trainer_does_not_import_the_fast_path():
    imported = set()
    for node in ast.walk(ast.parse((PACKAGE / "trainer.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not any("fast_path" in name for name in imported), sorted(imported)
