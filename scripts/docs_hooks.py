"""MkDocs hook: ship the generated notebooks with the site, so the docs can link to them.

Each `notebooks/*.ipynb` becomes `notebooks/NAME.ipynb` in the built site (a download that opens
in Jupyter, VS Code or Colab); links to them are checked by the strict build like any other.
"""

from pathlib import Path

from mkdocs.structure.files import File

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def on_files(files, config):
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File.generated(config, f"notebooks/{notebook.name}",
                                    abs_src_path=str(notebook)))
    return files
