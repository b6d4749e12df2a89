"""Checks of the style guide that a machine can make: functions and modules short enough to read
on a screen, the trainer kept free of how forward passes run, and imports that point down the
layers (STYLE.md points 1, 13 and 14). Each check has a twin that runs it on a known-wrong
package written to tmp_path, so none can pass vacuously."""

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minirlhf"
MAX_FUNCTION_LINES = 40
MAX_MODULE_LINES = 400
# Exempt for now: another change brings the exercises under the limits.
FUNCTION_LENGTH_EXEMPT = ("exercises/",)
MODULE_LENGTH_EXEMPT = ("exercises/lora.py",)


def long_functions(root: Path, limit: int, exempt: tuple[str, ...] = ()) -> list[str]:
    """`file:function (lines)` for every function or method longer than `limit` lines, in the
    files under `root` whose path (relative to `root`) starts with none of `exempt`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix().startswith(exempt):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.name} ({lines})")
    return found


def long_modules(root: Path, limit: int, exempt: tuple[str, ...] = ()) -> list[str]:
    """`file (lines)` for every module under `root` longer than `limit` lines, except `exempt`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > limit and not path.relative_to(root).as_posix().startswith(exempt):
            found.append(f"{path.relative_to(root.parent)} ({lines})")
    return found


def test_no_function_is_longer_than_forty_lines():
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES, FUNCTION_LENGTH_EXEMPT) == []


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text(f"def long():\n{body}\n")
    assert long_functions(tmp_path / "pkg", MAX_FUNCTION_LINES, FUNCTION_LENGTH_EXEMPT) == [
        f"pkg/long.py:long ({MAX_FUNCTION_LINES + 1})"]


def test_no_module_is_longer_than_four_hundred_lines():
    assert long_modules(PACKAGE, MAX_MODULE_LINES, MODULE_LENGTH_EXEMPT) == []


def test_the_module_length_check_sees_a_long_module(tmp_path):
    (tmp_path / "pkg" / "exercises").mkdir(parents=True)
    long_text = "".join(f"x{i} = {i}\n" for i in range(MAX_MODULE_LINES + 1))
    for name in ("long.py", "exercises/long.py", "exercises/lora.py"):
        (tmp_path / "pkg" / name).write_text(long_text)
    (tmp_path / "pkg" / "short.py").write_text("x = 1\n")
    assert long_modules(tmp_path / "pkg", MAX_MODULE_LINES, MODULE_LENGTH_EXEMPT) == [
        f"pkg/exercises/long.py ({MAX_MODULE_LINES + 1})", f"pkg/long.py ({MAX_MODULE_LINES + 1})"]


def test_the_trainer_does_not_import_the_fast_path():
    imported = set()
    for node in ast.walk(ast.parse((PACKAGE / "trainer.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not any("fast_path" in name for name in imported), sorted(imported)


# ---------------------------------------------------------------- layers (STYLE.md point 13)


def module_name(path: Path, root: Path) -> str:
    """`minirlhf.runtime.loading` for root/runtime/loading.py (a package: its folder's name)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def get_imports(path: Path, root: Path, module_level_only: bool = False) -> set[str]:
    """Every name a module imports, absolute: `from a.b import c` gives a.b and a.b.c (c may be a
    module). With `module_level_only`, imports inside functions (run only when called) are left
    out; those in class bodies and module-level `if`/`try` blocks run on import and count."""
    package = module_name(path, root).rsplit(".", 1)[0] if path.name != "__init__.py" else (
        module_name(path, root))
    names, todo = set(), [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: counted from this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        if module_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef
                                            | ast.Lambda):
            continue
        todo.extend(ast.iter_child_nodes(node))
    return names


def get_all_imports(root: Path, module_level_only: bool = False) -> dict[str, set[str]]:
    """Module name -> the names it imports, for every module under `root`."""
    return {module_name(path, root): get_imports(path, root, module_level_only)
            for path in sorted(root.rglob("*.py"))}


def within(name: str, prefix: str) -> bool:
    """Whether `name` is the module or package `prefix` or something inside it."""
    return name == prefix or name.startswith(prefix + ".")


MATH_MODULES = tuple(f"minirlhf.{name}" for name in
                     ("advantages", "losses", "memory", "kl_control", "optim", "rewards",
                      "fluency"))
"""The pure math: torch and its typing helpers only."""
TRAINER_MUST_NOT_IMPORT = ("minirlhf.pairs", "minirlhf.cli", "minirlhf.runtime.trunk",
                           "minirlhf.runtime.fast_path", "minirlhf.runtime.fast_weights",
                           "minirlhf.runtime.fast_blocks")
"""Learning from pairs, the command line, and how forward passes run (the fast path's three
modules, the frozen trunk): the trainer composes the pipeline without them."""

LAYER_RULES: dict[str, Callable[[str, str], bool]] = {
    "runtime imports only runtime": lambda module, name: (
        within(module, "minirlhf.runtime") and within(name, "minirlhf")
        and not within(name, "minirlhf.runtime")),
    "only the command line imports it": lambda module, name: (
        not within(module, "minirlhf.cli") and module != "minirlhf.__main__"
        and within(name, "minirlhf.cli")),
    "the math imports no minirlhf": lambda module, name: (
        module in MATH_MODULES and within(name, "minirlhf")),
    "the trainer imports no pairs, cli, trunk or fast path": lambda module, name: (
        module == "minirlhf.trainer" and any(within(name, x) for x in TRAINER_MUST_NOT_IMPORT)),
}
"""(module, a name it imports) -> whether that import breaks the rule. Every import counts,
those inside functions too: a lazy import is still a dependency."""


def layer_violations(root: Path, rule: str) -> list[str]:
    """`module imports name` for every import under `root` that breaks `LAYER_RULES[rule]`."""
    breaks = LAYER_RULES[rule]
    return [f"{module} imports {name}" for module, names in get_all_imports(root).items()
            for name in sorted(names) if breaks(module, name)]


def import_cycles(root: Path) -> list[list[str]]:
    """The import cycles among the modules under `root`, from module-level imports: each
    strongly connected component of more than one module (Tarjan's algorithm), sorted."""
    imports = get_all_imports(root, module_level_only=True)
    graph = {module: sorted(name for name in names if name in imports and name != module)
             for module, names in imports.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return sorted(cycles)


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_imports_point_down_the_layers(rule: str):
    assert layer_violations(PACKAGE, rule) == []


def test_there_is_no_import_cycle():
    assert import_cycles(PACKAGE) == []


WRONG_PACKAGE = {
    "runtime/low.py": "from ..trainer import RLHFTrainer\n",  # relative: minirlhf.trainer
    "sampling.py": "def plot():\n    from minirlhf.cli import report\n",
    "__main__.py": "from minirlhf.cli import main\n",
    "losses.py": "import torch\nfrom minirlhf.validation import check_positive\n",
    "trainer.py": "from minirlhf.runtime import fast_path\n",
    "a.py": "import minirlhf.b\n",
    "b.py": "from minirlhf import a\n",
    # A cycle only through an import inside a function: not one (it runs after both load).
    "c.py": "def f():\n    from minirlhf import d\n",
    "d.py": "import minirlhf.c\n",
}
"""A package breaking each rule once, written as tmp_path/minirlhf."""


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "minirlhf"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(("rule", "expected"), [
    ("runtime imports only runtime", ["minirlhf.runtime.low imports minirlhf.trainer",
                                      "minirlhf.runtime.low imports minirlhf.trainer.RLHFTrainer"]),
    ("only the command line imports it", ["minirlhf.sampling imports minirlhf.cli",
                                          "minirlhf.sampling imports minirlhf.cli.report"]),
    ("the math imports no minirlhf", [
        "minirlhf.losses imports minirlhf.validation",
        "minirlhf.losses imports minirlhf.validation.check_positive"]),
    ("the trainer imports no pairs, cli, trunk or fast path", [
        "minirlhf.trainer imports minirlhf.runtime.fast_path"]),
])
def test_the_layer_checks_see_an_import_pointing_up(tmp_path, rule: str, expected: list[str]):
    assert layer_violations(write_package(tmp_path, WRONG_PACKAGE), rule) == expected


def test_the_cycle_check_sees_a_cycle(tmp_path):
    assert import_cycles(write_package(tmp_path, WRONG_PACKAGE)) == [["minirlhf.a", "minirlhf.b"]]
