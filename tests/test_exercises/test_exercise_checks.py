"""The exercise checks: they pass minirlhf's solutions and catch, by name, known mistakes.

Without `--impl`, every check runs on the library's own function (it must pass) and on each
deliberately wrong implementation in `tests/wrong_impls/` (it must fail, and its message must name
the mistake). With `--impl PATH`, the checks run on the learner's file instead.
"""

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from minirlhf.exercises import (
    CHECKS,
    MISTAKES,
    ExerciseCheckError,
    answers,
    check_file,
    checkable,
    critic_free,
    dpo,
    get_reference,
    inspection,
    kl_lab,
    last_failure,
    learning_phase,
    memory_and_logprobs,
    objective,
    optim_and_learning,
    reward_model,
    rewards_and_advantages,
)
from minirlhf.exercises.__main__ import main
from minirlhf.exercises.core import Case, ReferenceOracleMismatch, check_function

TESTS = Path(__file__).resolve().parents[1]


def load_wrong_impls() -> list:
    """Import tests/wrong_impls as a package (without putting tests/ on sys.path)."""
    folder = TESTS / "wrong_impls"
    if "wrong_impls" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "wrong_impls", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["wrong_impls"] = package
        spec.loader.exec_module(package)
        for info in pkgutil.iter_modules([str(folder)]):
            importlib.import_module(f"wrong_impls.{info.name}")
    return sys.modules["wrong_impls"].WRONG_IMPLS


WRONG_IMPLS = load_wrong_impls()


@pytest.mark.parametrize("name", list(CHECKS))
def test_check_passes(name: str, learner_module: ModuleType | None):
    """minirlhf's solution passes its own check (or, with --impl, the learner's does)."""
    if learner_module is None:
        impl = get_reference(name)
    elif hasattr(learner_module, name):
        impl = getattr(learner_module, name)
    else:
        pytest.skip(f"{learner_module.__file__} does not define {name}")
    CHECKS[name](impl)


@pytest.mark.parametrize(
    "wrong", WRONG_IMPLS, ids=[f"{w.exercise}-{w.impl.__name__}" for w in WRONG_IMPLS]
)
def test_check_names_the_mistake(wrong, learner_module: ModuleType | None):
    if learner_module is not None:
        pytest.skip("--impl given: checking the learner's file, not the checks")
    with pytest.raises(ExerciseCheckError) as caught:
        CHECKS[wrong.exercise](wrong.impl)
    assert wrong.expected in str(caught.value), str(caught.value)
    failure = last_failure()  # the case of this very failure, with inputs to re-run it
    assert failure.exercise.startswith(wrong.exercise) and failure.inputs, failure
    assert f"Test case: {failure.case}." in str(caught.value)


def test_every_check_is_shown_catching_mistakes():
    counts = {name: sum(w.exercise == name for w in WRONG_IMPLS) + len(MISTAKES.get(name, []))
              for name in CHECKS}
    assert all(count >= 2 for count in counts.values()), counts


CATALOGUE = [(name, mistake) for name, mistakes in MISTAKES.items() for mistake in mistakes]


@pytest.mark.parametrize("name, mistake", CATALOGUE,
                         ids=[f"{name}-{i}" for i, (name, _) in enumerate(CATALOGUE)])
def test_every_catalogued_mistake_is_caught_and_named(name, mistake,
                                                      learner_module: ModuleType | None):
    """Each named mistake, fed to its own check, fails it with its own hint (no earlier one)."""
    if learner_module is not None:
        pytest.skip("--impl given: checking the learner's file, not the checks")
    with pytest.raises(ExerciseCheckError) as caught:
        CHECKS[name](mistake.imitate)
    assert f"Likely mistake: {mistake.hint}" in str(caught.value), str(caught.value)


def test_the_catalogue_covers_every_function_check():
    """Every check built on check_function has a catalogue (modules whose lists are not in it
    would name mistakes no test proves)."""
    lists = [value for module in (rewards_and_advantages, memory_and_logprobs, objective,
                                  optim_and_learning, learning_phase, reward_model, critic_free,
                                  dpo, answers, inspection, kl_lab, checkable)
             for key, value in vars(module).items() if key.endswith("_MISTAKES")]
    assert sorted(map(id, lists)) == sorted(map(id, MISTAKES.values()))


def test_a_reference_that_disagrees_with_its_oracle_is_reported():
    case = Case("one value", {"x": torch.tensor([1.0])})
    with pytest.raises(ReferenceOracleMismatch, match="bug in minirlhf"):
        check_function("double", lambda x: 2 * x, reference=lambda x: 3 * x,
                       oracle=lambda x: 2 * x, cases=[case], mistakes=[])


def test_failure_message_shows_shapes_and_first_mismatch():
    with pytest.raises(ExerciseCheckError) as caught:
        CHECKS["compute_one_step_advantages"](lambda values, rewards, prefix_len: torch.zeros(1, 1))
    assert "Expected shape (3, 4) = (batch, gen_len), got (1, 1)." in str(caught.value)
    with pytest.raises(ExerciseCheckError) as caught:
        CHECKS["normalize_reward"](lambda reward, eps=1e-5: reward * 0)
    assert "First mismatch at index (0,)" in str(caught.value)


def test_success_prints_one_line(capsys):
    CHECKS["compute_gae"](get_reference("compute_gae"))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "compute_gae passed" in out


LEARNER_FILE = '''
import torch
from minirlhf import compute_one_step_advantages  # a correct solution, imported


def normalize_reward(reward, eps=1e-5):  # the sample std, as the original design had it
    return (reward - reward.mean()) / (reward.std() + eps)
'''


def test_check_file_and_main(tmp_path, capsys):
    path = tmp_path / "my_solutions.py"
    path.write_text(LEARNER_FILE)
    results = check_file(path)
    assert results["compute_one_step_advantages"] == "passed"
    assert "did you use the sample std" in results["normalize_reward"]
    assert set(results) == {"compute_one_step_advantages", "normalize_reward"}
    captured = capsys.readouterr()
    assert "1 of 2 checks passed; \N{BALLOT X} failed: normalize_reward." in captured.out
    assert "\N{BALLOT X} normalize_reward failed:" in captured.err
    assert main([str(path)]) == 1
    assert main([str(tmp_path / "missing.py")]) == 2  # a message, not a traceback
    assert "No Python file at" in capsys.readouterr().err


def test_impl_option_runs_the_checks_on_a_learner_file(tmp_path, capsys):
    """`pytest --impl=FILE` (run here in-process, to save a second start of torch)."""
    path = tmp_path / "my_solutions.py"
    path.write_text(LEARNER_FILE)
    args = [str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--impl={path}",
            "-k", "test_check_passes", f"--rootdir={TESTS.parent}"]
    exit_code = pytest.main(args)
    out = capsys.readouterr().out
    assert exit_code == pytest.ExitCode.TESTS_FAILED, out
    skipped = len(CHECKS) - 2
    assert f"1 failed, 1 passed, {skipped} skipped" in out, out
    assert "did you use the sample std" in out


def test_the_objective_is_the_one_the_trainer_maximises():
    """The reference sum is the trainer's: a phase's logged terms add up to its objective."""
    from minirlhf.exercises.learning_phase import _make_trainer

    trainer, memory = _make_trainer()
    mb = memory.get_minibatches(1, 1, torch.Generator().manual_seed(0))[0]
    total, stats = trainer.compute_rlhf_objective(mb)
    terms = [torch.tensor(stats[f"losses/{name}"]) for name in objective.TERMS]
    assert objective.calc_rlhf_objective(*terms).item() == pytest.approx(total.item(), abs=1e-5)
