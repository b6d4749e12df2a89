"""The docs build with `mkdocs build --strict` (broken links or anchors, pages left out of the
navigation: all fail), and they cover every logged metric and every exercise check."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minirlhf.exercises import CHECKS

ROOT = Path(__file__).resolve().parents[1]


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2.0
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_docs_build_strictly(tmp_path):
    build = mkdocs_build(ROOT, tmp_path / "site")
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "site" / "advantages" / "index.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build can fail: the same docs with one dead link do not build."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "docs_hooks.py", tmp_path / "scripts")  # ships the notebooks
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns("*.py", "work"))
    assert mkdocs_build(tmp_path, tmp_path / "unbroken").returncode == 0  # the copy builds
    page = tmp_path / "docs" / "glossary.md"
    page.write_text(page.read_text() + "\nSee [the missing page](missing.md).\n")
    build = mkdocs_build(tmp_path, tmp_path / "site")
    assert build.returncode != 0
    assert "missing.md" in build.stdout + build.stderr


def test_every_logged_metric_is_documented():
    """Every key the trainer and its metrics module log (the learning metrics, the rollout's in
    `minirlhf.metrics`) has its entry in docs/metrics.md."""
    source = "".join((ROOT / "minirlhf" / name).read_text()
                     for name in ("trainer.py", "metrics.py", "evaluation.py", "pass_at_k.py"))
    keys = set(re.findall(r'"((?:charts|losses|eval)/\w+)"', source))
    assert len(keys) >= 20, keys
    documented = (ROOT / "docs" / "metrics.md").read_text()
    assert not [key for key in keys if f"`{key}`" not in documented]


def test_every_check_is_documented():
    page = (ROOT / "docs" / "exercises.md").read_text()
    assert not [check.__name__ for check in CHECKS.values() if f"`{check.__name__}`" not in page]


def test_the_built_site_loads_nothing_from_the_network(tmp_path):
    """Math renders offline: MathJax ships in docs/javascripts/mathjax/, no CDN script, stylesheet
    or web font is referenced (links a reader clicks are fine)."""
    build = mkdocs_build(ROOT, tmp_path / "site")
    assert build.returncode == 0, build.stdout + build.stderr
    pages = list((tmp_path / "site").rglob("*.html"))
    external = re.compile(r'<(?:script|link)\b[^>]*(?:src|href)="(?:https?:)?//[^"]*"')
    loaded = {match for page in pages for match in external.findall(page.read_text())}
    assert not loaded, loaded
    assert (tmp_path / "site" / "javascripts" / "mathjax" / "tex-svg.js").is_file()


def test_formulas_render_in_a_browser_without_the_network(tmp_path):
    """Headless Chromium (skipped where none is installed) typesets the objective page's formulas
    from the vendored MathJax: SVG math and no MathJax error, with file:// URLs only."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium installed")
    build = mkdocs_build(ROOT, tmp_path / "site")
    assert build.returncode == 0, build.stdout + build.stderr
    page = (tmp_path / "site" / "objective" / "index.html").as_uri()
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--virtual-time-budget=8000", "--dump-dom", page]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<mjx-container") >= 5, dom[-2000:]
    assert "<svg" in dom
    assert not re.search(r'<g[^>]*data-mml-node="merror"', dom), "a formula MathJax cannot parse"
