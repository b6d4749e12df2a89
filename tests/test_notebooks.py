"""The notebooks: generated from their sources, exercises hidden, and every one runs.

The solution notebooks (and notebook 5, which has no exercises) are executed top to bottom with
nbclient on their small defaults: tiny random models, and SmolLM2 for a couple of short phases.
"""

import importlib.util
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from minirlhf.exercises import CHECKS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_notebooks = load_generator()
RUNNABLE = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if "_exercises" not in p.name)
EXERCISES = sorted(NOTEBOOKS.glob("*_exercises.ipynb"))


def code(notebook: Path) -> str:
    cells = nbformat.read(notebook, as_version=4).cells
    return "\n".join(cell.source for cell in cells if cell.cell_type == "code")


def test_generated_notebooks_are_up_to_date():
    stale = make_notebooks.stale(make_notebooks.generate())
    assert not stale, (f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}; run "
                       "`python scripts/make_notebooks.py`")


def test_a_source_edit_makes_the_notebooks_stale(tmp_path, monkeypatch):
    """The drift check can fail: change a source, and its notebooks no longer match."""
    source = make_notebooks.SOURCES / "02_rewards_and_advantages.py"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / source.name).write_text(source.read_text().replace("float32", "float64"))
    for path in NOTEBOOKS.glob("02_*.ipynb"):
        (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(make_notebooks, "SOURCES", tmp_path / "src")
    monkeypatch.setattr(make_notebooks, "OUTPUT", tmp_path)
    stale = make_notebooks.stale(make_notebooks.generate())
    assert sorted(p.name for p in stale) == ["02_rewards_and_advantages_exercises.ipynb",
                                             "02_rewards_and_advantages_solutions.ipynb"]


def test_split_solution_keeps_indentation():
    source = ('def f(x):\n    """Doc."""\n    # BEGIN SOLUTION\n    return x\n'
              "    # END SOLUTION")
    exercise, solution, found = make_notebooks.split_solution(source)
    assert found
    assert exercise == ('def f(x):\n    """Doc."""\n    # YOUR CODE HERE\n'
                        "    raise NotImplementedError()")
    assert solution == 'def f(x):\n    """Doc."""\n    return x'
    with pytest.raises(ValueError, match="without END"):
        make_notebooks.split_solution("# BEGIN SOLUTION\nx = 1")


@pytest.mark.parametrize("notebook", EXERCISES, ids=lambda p: p.stem)
def test_exercise_notebooks_hide_the_solutions(notebook: Path):
    """Every exercise body is left to the learner, and its solution is collapsed below."""
    cells = nbformat.read(notebook, as_version=4).cells
    blanks = sum(c.source.count("raise NotImplementedError()") for c in cells
                 if c.cell_type == "code")
    details = [c.source for c in cells if c.source.startswith("<details><summary>Solution")]
    assert blanks >= len(details) >= 1
    solutions = code(NOTEBOOKS / notebook.name.replace("_exercises", "_solutions"))
    assert "BEGIN SOLUTION" not in code(notebook) + solutions
    for block in details:  # the collapsed solution is the one the solutions notebook runs
        body = block.split("```python\n", 1)[1].split("\n```", 1)[0]
        assert body in solutions


def test_every_check_has_an_exercise_in_a_notebook():
    used = set(re.findall(r"exercises\.(check_\w+)\(", "".join(code(p) for p in EXERCISES)))
    assert used == {check.__name__ for check in CHECKS.values()}


@pytest.mark.parametrize("name", RUNNABLE)
def test_notebook_runs_top_to_bottom(name: str):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    # One thread per kernel: on a 2-core machine shared with other work, torch's default of one
    # thread per core makes SmolLM2's phases up to ten times slower (threads wait on busy cores).
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    if "_solutions" in name:
        checks = sum("passed" in o.get("text", "") for o in outputs)
        assert checks == code(NOTEBOOKS / name).count("exercises.check_")
    assert any("image/png" in o.get("data", {}) for o in outputs), "a notebook shows a plot"
    print(f"{name}: {time.perf_counter() - start:.0f} s")
