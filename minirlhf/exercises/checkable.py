"""Checks for notebook 12, RL on an answer a program can check: an exact checker for a sum
(`is_exact_sum`), pass@k's unbiased estimator (`calc_pass_at_k`), and the share of GRPO groups
whose rewards have no spread (`get_zero_spread_share`).

The oracles are written apart from the library: the checker against a table of answers judged by
hand; pass@k by enumerating every way to draw k of the n answers (`itertools.combinations`); the
zero-spread share with a loop over the groups and Python sets. Each known mistake is a function
that makes it, and a hint is shown when the learner's results match it on every case.
"""

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.advantages import get_zero_std_fraction
from minirlhf.exercises.core import Mistake, passed
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.pass_at_k import calc_pass_at_k

Judged = tuple[str, dict[str, Any], Any]
"""A case: its name, its arguments, and the expected result."""


def _check_cases(exercise: str, fn: Callable[..., Any], cases: list[Judged],
                 mistakes: list[Mistake], atol: float = 1e-6) -> None:
    """Call `fn` positionally on every case; on the first wrong result, fail with the hint of
    the one mistake that reproduces the learner's results on every case (if one does)."""
    __tracebackhide__ = True
    results = [call(fn, kwargs, positional=True) for _, kwargs, _ in cases]
    for (name, kwargs, want), (got, error) in zip(cases, results, strict=True):
        if error is not None:
            fail(exercise, name, describe_error(error), crash_hint(error), inputs=kwargs,
                 expected=want, got=got, error=error)
        if got is None or not math.isclose(float(got), float(want), abs_tol=atol):
            hints = [mistake.hint for mistake in mistakes
                     if all(r[1] is None and r[0] is not None and math.isclose(
                         float(r[0]), float(mistake.imitate(*k.values())), abs_tol=atol)
                         for (_, k, _), r in zip(cases, results, strict=True))]
            fail(exercise, name, f"Expected {want!r}, got {got!r}.",
                 hints[0] if len(hints) == 1 else None, inputs=kwargs, expected=want, got=got)


# ---------------------------------------------------------------- the exact checker


def reference_is_exact_sum(response: str, answer: str) -> float:
    """1.0 when the response, stripped of whitespace and one final period, is the answer's
    digits and nothing else; else 0.0."""
    text = response.strip()
    text = text[:-1].rstrip() if text.endswith(".") else text
    return float(text == answer)


SUM_CASES: list[tuple[str, str, float]] = [
    ("85", "85", 1.0), (" 85", "85", 1.0), ("85.", "85", 1.0), ("85 \n", "85", 1.0),
    ("84 85 86", "85", 0.0), ("85 85", "85", 0.0), ("The answer is 85.", "85", 0.0),
    ("1859", "85", 0.0), ("a85b", "85", 0.0), ("085", "85", 0.0), ("+85", "85", 0.0),
    ("85..", "85", 0.0), ("86", "85", 0.0), ("", "85", 0.0), ("8 5", "85", 0.0),
    ("7", "7", 1.0), ("17", "7", 0.0),
]
"""(response, answer, the score a person gives it): right, wrong and gamed answers."""


def _loose(response: str, answer: str) -> float:
    return float(answer in response)


def _as_int(response: str, answer: str) -> float:
    try:
        return float(int(response.strip().rstrip(".")) == int(answer))
    except ValueError:
        return 0.0


SUM_MISTAKES = [
    Mistake("the answer is only looked for inside the response (`answer in response`): that is "
            "the loose checker, which pays for '84 85 86', '1859' and 'The answer is 85.'. "
            "Compare the whole stripped response with the answer.", _loose),
    Mistake("the answer is looked for among the response's words: '84 85 86' and '85 85' list "
            "it and still pass. The response must be the answer alone.",
            lambda response, answer: float(answer in response.replace(".", " ").split())),
    Mistake("the response is not stripped: ' 85' and '85 \\n' are right answers with "
            "whitespace around them. Use response.strip().",
            lambda response, answer: float(response in (answer, answer + "."))),
    Mistake("the response is compared as a number (int(...)): '085' and '+85' are not the "
            "answer written as the prompt asks. Compare strings.", _as_int),
    Mistake("every final period is removed (rstrip('.')): '85..' is not an answer that ends "
            "with one period. Remove at most one.",
            lambda response, answer: float(response.strip().rstrip(".").rstrip() == answer)),
    Mistake("the final period is not removed: '85.' is the answer followed by the end of a "
            "sentence.", lambda response, answer: float(response.strip() == answer)),
]


@learner_facing
def check_is_exact_sum(fn: Callable[[str, str], float]) -> None:
    """Check `fn(response, answer)`: 1.0 for the answer alone, else 0.0."""
    cases = [(f"response {response!r}, answer {answer!r}",
              {"response": response, "answer": answer}, want)
             for response, answer, want in SUM_CASES]
    for _, kwargs, want in cases:
        assert reference_is_exact_sum(**kwargs) == want, f"reference != hand table on {kwargs}"
    _check_cases("is_exact_sum", fn, cases, SUM_MISTAKES)
    passed("is_exact_sum", f"{len(cases)} answers judged as by hand (right ones with spaces or "
           "a period, lists, repeats, the sum inside a number or a sentence, 085, +85)")


# ---------------------------------------------------------------- pass@k


def _pass_at_k_oracle(n: int, c: int, k: int) -> float:
    """Every draw of k of the n answers (c of which pass), counted: the share holding a pass."""
    answers = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(answers[i] for i in draw) for draw in draws) / len(draws)


PASS_AT_K_CASES = [(n, c, k) for n, c, k in [(4, 1, 1), (4, 1, 2), (8, 3, 4), (8, 0, 3),
                                             (8, 8, 1), (6, 4, 3), (10, 2, 5), (5, 5, 5),
                                             (9, 1, 9), (7, 2, 2)]]

PASS_AT_K_MISTAKES = [
    Mistake("this is the share of answers that pass, c / n: pass@1, whatever k. pass@k asks "
            "whether any of k answers passes.", lambda n, c, k: c / n),
    Mistake("1 - (1 - c/n)^k draws the k answers *with* replacement: biased (Chen et al. 2021 "
            "use it as the counter-example). Draw without replacement: 1 - C(n - c, k) / "
            "C(n, k).", lambda n, c, k: 1 - (1 - c / n) ** k),
    Mistake("this is the chance that no drawn answer passes, C(n - c, k) / C(n, k): pass@k is "
            "one minus it.", lambda n, c, k: math.comb(n - c, k) / math.comb(n, k)),
    Mistake("the counts are swapped: C(c, k) / C(n, k) is the chance that *every* drawn answer "
            "passes.", lambda n, c, k: math.comb(c, k) / math.comb(n, k)),
]


@learner_facing
def check_calc_pass_at_k(fn: Callable[[int, int, int], float]) -> None:
    """Check `fn(n, c, k)`: the unbiased pass@k of one prompt from n answers, c of them passing."""
    cases = []
    for n, c, k in PASS_AT_K_CASES:
        want = _pass_at_k_oracle(n, c, k)
        assert math.isclose(calc_pass_at_k(n, c, k), want), f"reference != oracle at {n, c, k}"
        cases.append((f"n={n}, c={c}, k={k}", {"n": n, "c": c, "k": k}, want))
    _check_cases("calc_pass_at_k", fn, cases, PASS_AT_K_MISTAKES)
    passed("calc_pass_at_k", f"{len(cases)} cases match the reference and a count of every "
           "draw of k answers (none passing, all passing, k = n)")


# ---------------------------------------------------------------- the zero-spread share


def _zero_spread_oracle(rewards: Float[Tensor, " batch"], group_size: int) -> float:
    """Adjacent samples share a prompt: count the groups whose rewards form a set of one."""
    values = rewards.tolist()
    groups = [values[i : i + group_size] for i in range(0, len(values), group_size)]
    return sum(len(set(group)) == 1 for group in groups) / len(groups)


def _zero_spread_cases() -> list[Judged]:
    torch.manual_seed(0)
    cases = {"hand-made: 4 groups of 2, two with no spread":
             (torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.25, 1.0]), 2),
             "groups of 4, each all-1, all-0 or mixed":
             (torch.tensor([1.0] * 4 + [0.0] * 4 + [0.0, 1.0, 0.0, 0.0] + [0.5] * 4), 4),
             "a group of 3 of equal partial credit, and one of 0, 0, 1":
             (torch.tensor([0.25, 0.25, 0.25, 0.0, 0.0, 1.0]), 3),
             "random 0/1 rewards, 6 groups of 4":
             (torch.randint(0, 2, (24,)).float(), 4),
             "one group": (torch.tensor([1.0, 1.0, 1.0]), 3)}
    return [(name, {"rewards": rewards, "group_size": size}, _zero_spread_oracle(rewards, size))
            for name, (rewards, size) in cases.items()]


def _share_equal(groups: Float[Tensor, "group group_size"]) -> float:
    return (groups == groups[:, :1]).all(dim=1).float().mean().item()


ZERO_SPREAD_MISTAKES = [
    Mistake("the groups are cut the wrong way: rewards.view(group_size, -1) puts every "
            "group_size-th sample together, but the trainer repeats each prompt group_size "
            "times in a row. Use rewards.view(-1, group_size).",
            lambda rewards, group_size: _share_equal(rewards.view(group_size, -1).T)),
    Mistake("only groups whose rewards are all 0 are counted: a group that always passes (all "
            "1) has no spread either, and teaches GRPO nothing.",
            lambda rewards, group_size: (rewards.view(-1, group_size) == 0).all(dim=1)
            .float().mean().item()),
    Mistake("this is the share of groups *with* a spread: the share that teaches nothing is "
            "one minus it.",
            lambda rewards, group_size: 1 - _zero_spread_oracle(rewards, group_size)),
]


@learner_facing
def check_get_zero_spread_share(fn: Callable[..., float]) -> None:
    """Check `fn(rewards, group_size)`: the share of groups whose rewards are all equal."""
    cases = _zero_spread_cases()
    for _, kwargs, want in cases:
        assert abs(get_zero_std_fraction(**kwargs) - want) < 1e-6, "reference != oracle"
    _check_cases("get_zero_spread_share", fn, cases, ZERO_SPREAD_MISTAKES)
    passed("get_zero_spread_share", f"{len(cases)} cases match the reference and a loop over "
           "the groups (all passing, all failing, equal partial credit, random)")


REFERENCES = {"is_exact_sum": reference_is_exact_sum, "calc_pass_at_k": calc_pass_at_k,
              "get_zero_spread_share": get_zero_std_fraction}
"""minirlhf's solution of each exercise of notebook 12."""
