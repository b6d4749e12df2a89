"""Deliberately wrong implementations of every exercise, each with the hint its check must give.

Every function or class here is a mistake a learner could make. `tests/test_exercises/` feeds
each to its check and expects an `ExerciseCheckError` whose message contains `expected`: the
check must both catch the mistake and name it. The modules follow the notebooks (1 to 4).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class WrongImpl:
    exercise: str
    """The name in `minirlhf.exercises.CHECKS` whose check this is fed to."""
    expected: str
    """A fragment the check's message must contain (the named mistake, or the difference)."""
    impl: Any
    """The wrong function or class."""


WRONG_IMPLS: list[WrongImpl] = []


def wrong(exercise: str, expected: str) -> Callable[[Any], Any]:
    """Register the decorated function or class as a wrong implementation of `exercise`."""

    def register(impl: Any) -> Any:
        WRONG_IMPLS.append(WrongImpl(exercise, expected, impl))
        return impl

    return register
