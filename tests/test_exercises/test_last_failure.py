"""After any failing check, `last_failure()` holds that check's case, never the previous one's."""

import pytest
from test_exercise_checks import WRONG_IMPLS

from minirlhf import exercises
from minirlhf.exercises import CHECKS, MISTAKES, ExerciseCheckError, last_failure


def a_wrong_impl(name: str):
    wrong = [w.impl for w in WRONG_IMPLS if w.exercise == name]
    return wrong[0] if wrong else MISTAKES[name][0].imitate


def fail_another_check(name: str) -> None:
    """Leave a failure of a different exercise behind, so a stale one would show."""
    other = "normalize_reward" if name != "normalize_reward" else "compute_gae"
    with pytest.raises(ExerciseCheckError):
        CHECKS[other](a_wrong_impl(other))
    assert last_failure().exercise == other


@pytest.mark.parametrize("name", list(CHECKS))
def test_a_failing_check_records_its_own_case(name):
    fail_another_check(name)
    with pytest.raises(ExerciseCheckError) as caught:
        CHECKS[name](a_wrong_impl(name))
    failure = last_failure()
    assert failure.exercise.startswith(name), str(caught.value)
    assert f"Test case: {failure.case}." in str(caught.value)
    assert failure.inputs, f"{name} recorded no inputs to re-run"
    assert exercises.last_failure() is failure
