"""Checks for config dataclasses (`RLHFArgs`, `RewardModelArgs`), called from `__post_init__`.

Each check reads named fields off the config and raises a `ValueError` that names the field, its
value and the allowed range, so a learner knows which argument to change. Knows nothing else.
"""

import typing
from collections.abc import Iterable, Iterator


def get_values(config: object, names: Iterable[str], optional: bool) -> Iterator[tuple]:
    """(name, value) of each named field; with `optional`, fields holding None are skipped."""
    for name in names:
        value = getattr(config, name)
        if not (optional and value is None):
            yield name, value


def check_at_least(config: object, names: Iterable[str], minimum: int = 1,
                   optional: bool = False):
    """Each field is at least `minimum` (with `optional`, None is allowed too)."""
    for name, value in get_values(config, names, optional):
        if value < minimum:
            allowed = f"None or at least {minimum}" if optional else f"at least {minimum}"
            raise ValueError(f"{name} must be {allowed}, got {value}.")


def check_positive(config: object, names: Iterable[str]):
    """Each field is > 0 (learning rates, clip ranges, norms)."""
    for name, value in get_values(config, names, optional=False):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}.")


def check_weights(config: object, names: Iterable[str]):
    """Each field is >= 0: a weight in the objective, which 0 switches off."""
    for name, value in get_values(config, names, optional=False):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (a weight), got {value}.")


def check_interval(config: object, names: Iterable[str], low: float, high: float,
                   open_low: bool = False, open_high: bool = False, optional: bool = False):
    """Each field lies in the interval from `low` to `high`, closed unless `open_low`/`open_high`
    (with `optional`, None is allowed too)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    for name, value in get_values(config, names, optional):
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below):
            allowed = f"be None or lie in {interval}" if optional else f"lie in {interval}"
            raise ValueError(f"{name} must {allowed}, got {value}.")


def check_choice(config: object, name: str):
    """The field holds one of the values its `Literal[...]` annotation lists (a runtime type
    checker refuses others first; without one, as on the command line, this does)."""
    choices = typing.get_args(typing.get_type_hints(type(config))[name])
    if getattr(config, name) not in choices:
        quoted = ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'
        raise ValueError(f"{name} must be {quoted}, got {getattr(config, name)!r}.")
