"""`--impl PATH` (or MINIRLHF_IMPL=PATH): run the exercise checks on a learner's Python file.

This folder's name starts with "test", so pytest reads this conftest before parsing the command
line whenever it collects `tests/` (or this folder): the option works with `pytest`,
`pytest tests` and `pytest tests/test_exercises`. Given `--impl`, pytest runs only the tests that
call a check on the learner's functions and deselects the rest of the suite, which tests minirlhf
itself, not the learner's file.
"""

import os
from types import ModuleType

import pytest

IMPL_ENV = "MINIRLHF_IMPL"
LEARNER_TESTS = {"test_check_passes"}  # the tests that run a check on the learner's function


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--impl",
        default=os.environ.get(IMPL_ENV) or None,
        metavar="PATH",
        help="A learner's Python file: run each exercise check on the function of the same name "
        f"it defines (checks of functions it does not define are skipped). Also ${IMPL_ENV}.",
    )


@pytest.fixture(scope="session")
def learner_module(request: pytest.FixtureRequest) -> ModuleType | None:
    """The learner's file as a module, or None to check minirlhf's own solutions."""
    from minirlhf.exercises import load_file  # imported late: after jaxtyping's import hook

    path = request.config.getoption("--impl")
    return load_file(path) if path else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With --impl, keep only the exercise checks run on the learner's file."""
    if not config.getoption("--impl"):
        return
    keep = [item for item in items if getattr(item, "originalname", None) in LEARNER_TESTS]
    deselected = [item for item in items if item not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
