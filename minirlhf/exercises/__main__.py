"""The exercises from the command line.

    python -m minirlhf.exercises start [FOLDER]   # copy the exercise notebooks to work on
    python -m minirlhf.exercises my_solutions.py  # run every check the file has a function for

`start` copies `notebooks/*_exercises.ipynb` (and notebook 5, which has no exercises) into
`notebooks/work/` (or FOLDER), writes a `.gitignore` there that ignores the whole folder, and never
overwrites a notebook you have already started. Filling in the copies leaves git clean and the
generated notebooks, which the tests compare with their sources, untouched.
"""

import shutil
import sys
from pathlib import Path

from minirlhf.exercises import check_file

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
WORK = NOTEBOOKS / "work"


def start(folder: Path = WORK, notebooks: Path = NOTEBOOKS) -> list[Path]:
    """Copy the notebooks a learner fills in to `folder`; return the ones copied now."""
    sources = sorted(p for p in notebooks.glob("*.ipynb") if "_solutions" not in p.name)
    if not sources:
        raise FileNotFoundError(f"No notebooks in {notebooks}: `start` needs a clone of the "
                                "minirlhf repository (pip install -e .).")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("# made by `python -m minirlhf.exercises start`\n*\n")
    copied = []
    for source in sources:
        target = folder / source.name
        if not target.exists():
            shutil.copyfile(source, target)
            copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "start" and len(args) <= 2:
        folder = Path(args[1]) if len(args) == 2 else WORK
        copied = start(folder)
        print(f"Copied {len(copied)} notebooks to {folder} (kept any you had started). Open "
              f"{folder / '01_model_and_sampling_exercises.ipynb'} and work there.")
        return 0
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        results = check_file(args[0])
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    return 0 if results and all(r == "passed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
