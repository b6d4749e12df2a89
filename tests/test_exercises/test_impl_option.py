"""`pytest tests --impl=FILE` runs the exercise checks on the learner's file and nothing else."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def collected(*args: str) -> list[str]:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
               "tests/test_exercises/test_exercise_checks.py", "tests/test_glossary.py", *args]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [line for line in run.stdout.splitlines() if "::" in line]


@pytest.mark.slow  # 30 s: a pytest run in a subprocess
def test_impl_deselects_everything_but_the_checks(tmp_path):
    learner = tmp_path / "mine.py"
    learner.write_text("def normalize_reward(reward, eps=1e-5):\n    return reward\n")
    everything = collected()
    checks_only = collected(f"--impl={learner}")
    assert any("test_glossary.py" in line for line in everything)
    assert checks_only and all("::test_check_passes[" in line for line in checks_only)
    assert len(checks_only) < len(everything)
