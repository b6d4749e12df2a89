"""docs/glossary.md defines every jaxtyping dimension name the library uses.

The names are read from the annotations themselves (`Float[Tensor, "batch gen_len"]`, `Int[...]`,
`Bool[...]`), so a new name in the code without a line in the glossary fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANNOTATION = re.compile(r'\b(?:Float|Int|Bool)\[\s*[\w.]+\s*,\s*"([^"]*)"\s*\]')
NAME = re.compile(r"[A-Za-z_]\w*")


def get_dimension_names(sources: list[str]) -> set[str]:
    """Every named axis in the shape strings: `*batch` gives `batch`, a fixed size gives nothing."""
    names = set()
    for source in sources:
        for shape in ANNOTATION.findall(source):
            for axis in shape.split():
                names.update(NAME.findall(axis.lstrip("*")))
    return names


def get_glossary_entries(glossary: str) -> set[str]:
    """The names that open a row of the glossary's tables (`| \\`name\\` | ...`)."""
    return set(re.findall(r"^\| `([^`]+)` \|", glossary, flags=re.MULTILINE))


def missing_names(sources: list[str], glossary: str) -> list[str]:
    return sorted(get_dimension_names(sources) - get_glossary_entries(glossary))


def library_sources() -> list[str]:
    files = sorted((ROOT / "minirlhf").glob("*.py")) + sorted((ROOT / "minirlhf").glob("*/*.py"))
    return [path.read_text() for path in files]


def test_every_dimension_name_is_in_the_glossary():
    names = get_dimension_names(library_sources())
    assert {"batch", "gen_len", "d_model", "d_vocab"} <= names, names  # the extraction works
    missing = missing_names(library_sources(), (ROOT / "docs" / "glossary.md").read_text())
    assert not missing, f"used in minirlhf/ but not defined in docs/glossary.md: {missing}"


def test_the_extraction_reads_every_kind_of_shape():
    source = '''x: Float[Tensor, "*batch d_model"]
    y: Int[torch.Tensor, " gen_len"]
    z: Bool[Tensor, "batch 1 new_seq rotary_dim"]
    s: Float[Tensor, ""]
    w: Float[Tensor, "seq-1"]'''
    assert get_dimension_names([source]) == {
        "batch", "d_model", "gen_len", "new_seq", "rotary_dim", "seq"}


def test_a_name_missing_from_the_glossary_is_reported():
    glossary = (ROOT / "docs" / "glossary.md").read_text()
    rows = glossary.splitlines()
    without_hd = "\n".join(line for line in rows if not line.startswith("| `hd` |"))
    assert missing_names(library_sources(), without_hd) == ["hd"]
    # A name mentioned only in prose is not a definition.
    assert missing_names(library_sources(), without_hd + "\nThe `hd` axis.\n") == ["hd"]
