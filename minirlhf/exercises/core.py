"""The machinery every check shares: call the learner's code, compare, name the likely mistake.

A check feeds the learner's function a few seeded `Case`s (several shapes and edge cases). For
each, it computes the answer twice, with the library's reference solution and with an independent
oracle (a naive loop, `torch.distributions`, numbers worked by hand), and insists those two agree
before it judges the learner. When the learner's answer differs, it says how (shapes, values, the
first mismatching position) and replays each known `Mistake` on the same inputs: if one of them
reproduces the learner's answer (or error), its hint is shown.

How a failure is reported to the learner (their own traceback, the inputs as code, the case to
re-run) lives in `reporting.py`.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from minirlhf.exercises.inputs import (  # noqa: F401 (the checks import them from here)
    load_char_model,
    randn,
    seeded,
    single_threaded,
)
from minirlhf.exercises.reporting import (
    call,
    clone_inputs,
    crash_hint,
    describe_error,
    fail,
)

ATOL = 1e-5
RTOL = 1e-4


class ReferenceOracleMismatch(RuntimeError):
    """The library's reference and the independent oracle disagree: a bug in minirlhf itself."""


@dataclass
class Case:
    """One set of inputs fed to the function under test (keyword arguments) and its name."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    stability: str = ""
    """For a case whose inputs make a formula that is right in exact arithmetic overflow in
    float32: the stable form, shown when the learner's result is inf or NaN there."""


@dataclass
class Mistake:
    """A common mistake: a function that makes it, and the hint shown when the learner's matches."""

    hint: str
    imitate: Callable[..., Any]
    gradient_only: bool = False
    """Its values are right and only its gradient is wrong (a detached factor)."""


def changed_inputs(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Names of tensor arguments the function modified in place."""
    return [
        key
        for key, value in before.items()
        if isinstance(value, Tensor)
        and not torch.equal(value.detach(), after[key].detach())
        and not (value.isnan().any() and value.isnan().equal(after[key].isnan()))
    ]


# ---------------------------------------------------------------- comparing answers


def fmt(value: float) -> str:
    return f"{value:.6g}"


def describe_difference(
    expected: Any, got: Any, atol: float = ATOL, rtol: float = RTOL, dims: str = ""
) -> str | None:
    """None if `got` matches `expected`; otherwise what differs, in words.

    Args:
        dims: the dimension names of the expected shape, shown beside it ("(batch, gen_len)").
    """
    if not isinstance(expected, Tensor):
        return None if got == expected else f"Expected {expected!r}, got {got!r}."
    if not isinstance(got, Tensor):
        kind = type(got).__name__
        hint = " (did you call .item() or .tolist()?)" if isinstance(got, float | list) else ""
        return f"Expected a torch.Tensor of shape {tuple(expected.shape)}, got a {kind}{hint}."
    if got.shape != expected.shape:
        names = f" = ({dims})" if dims else ""
        return f"Expected shape {tuple(expected.shape)}{names}, got {tuple(got.shape)}."
    if expected.is_floating_point() and not got.is_floating_point():
        return f"Expected floats, got a {got.dtype} tensor: use a floating-point dtype."
    if not expected.is_floating_point() and got.is_floating_point():
        return (f"Expected integers ({expected.dtype}), got a {got.dtype} tensor: positions and "
                "token ids index other tensors, so return integers (torch.long).")
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    if got.isnan().any() and not expected.isnan().any():
        where = tuple(got.isnan().nonzero()[0].tolist())
        return f"Your result has NaN (first at index {where}); the expected result has none."
    close = torch.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if close.all():
        return None
    if expected.dim() == 0:
        return f"Expected {fmt(expected.item())}, got {fmt(got.item())}."
    first = tuple(int(i) for i in (~close).nonzero()[0])
    diff = (got - expected).abs().nan_to_num(nan=math.inf).max().item()
    return (
        f"First mismatch at index {first}: expected {fmt(expected[first].item())}, got "
        f"{fmt(got[first].item())} ({int((~close).sum())} of {close.numel()} values differ, "
        f"largest difference {fmt(diff)})."
    )


def outcome_difference(
    got: Any, error: BaseException | None, other: Any, other_error: BaseException | None
) -> str | None:
    """None if two calls ended the same way (the same error, or results that match), else how
    they differ."""
    if error is not None or other_error is not None:
        if error is None or other_error is None:
            return "one call raised and the other did not"
        if type(error) is not type(other_error) or str(error) != str(other_error):
            return f"different errors: {error!r} and {other_error!r}"
        return None
    if isinstance(other, Tensor) and isinstance(got, Tensor):
        return describe_difference(other, got)
    return f"not two tensors: {type(got).__name__} and {type(other).__name__}"


@dataclass
class Outcome:
    """What a function did on one case: its result (or error) and the gradient of its result."""

    value: Any
    error: BaseException | None
    inputs: dict[str, Any]
    """The copies of the inputs it was called on (to see whether it changed them in place)."""
    grads: dict[str, Tensor] | None = None
    """d(weighted sum of the result)/d(each input that requires grad); None without a gradient."""


def gradients(result: Any, inputs: dict[str, Any]) -> dict[str, Tensor] | None:
    """The gradient of `(result * weights).sum()` with respect to each input that requires grad,
    the weights seeded and fixed (1 for a scalar), so every element of the result counts."""
    leaves = {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad}
    if not (leaves and isinstance(result, Tensor) and result.requires_grad):
        return None
    weights = torch.randn(result.shape, generator=seeded(0)) if result.dim() else torch.ones(())
    total = (result * weights.to(result.dtype)).sum()
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    # the gradient with respect to an input that is NaN (padding) means nothing: left out
    return {name: torch.zeros_like(leaf) if grad is None else grad.detach().where(
        leaf.isfinite(), 0.0) for (name, leaf), grad in zip(leaves.items(), grads, strict=True)}


def run_case(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Outcome:
    """Call `fn` positionally on fresh copies of a case's inputs; keep its gradient too."""
    inputs = clone_inputs(kwargs)
    value, error = call(fn, inputs, positional=True)
    try:
        grads = None if error is not None else gradients(value, inputs)
    except RuntimeError:  # a result that looks differentiable but is not (an in-place edit)
        grads = None
    return Outcome(value, error, inputs, grads)


def same_outcome(a: Outcome, b: Outcome, with_grads: bool) -> bool:
    if outcome_difference(a.value, a.error, b.value, b.error) is not None:
        return False
    if not with_grads or a.grads is None or b.grads is None:
        return not with_grads or (a.grads is None) == (b.grads is None)
    return all(describe_difference(a.grads[k], b.grads[k]) is None for k in a.grads)


def find_mistake(mistakes: list[Mistake], cases: list[Case], outcomes: list[Outcome],
                 with_grads: bool = False) -> str | None:
    """The hint of the one known mistake that reproduces the learner's outcomes on every case
    (results, and gradients when `with_grads`); None when none does, or more than one.

    The cases are chosen so that no two mistakes coincide on all of them: a hint is shown only
    when the evidence points to one mistake and nothing else.
    """
    matching = [mistake for mistake in mistakes
                if all(same_outcome(outcome, run_case(mistake.imitate, case.kwargs), with_grads)
                       for case, outcome in zip(cases, outcomes, strict=True))]
    return matching[0].hint if len(matching) == 1 else None


def hint_from_every_case(mistakes: list[Mistake], cases: list[Case], case: Case,
                         fn: Callable[..., Any]) -> str | None:
    """`find_mistake` for a check that judges one case at a time: `fn` run on every case, the
    failing `case` first."""
    ordered = [case, *(other for other in cases if other is not case)]
    return find_mistake(mistakes, ordered, [run_case(fn, other.kwargs) for other in ordered])


def scalar_reasons(expected: Any, got: Any, inputs: dict[str, Any]) -> dict[tuple, str]:
    """For a wrong scalar, every explanation that fits, by a key that does not depend on sizes:
    off by its sign, or by a factor that is the length of an axis of an input (a sum where a mean
    belongs, or a mean over the wrong axes)."""
    if not (isinstance(expected, Tensor) and isinstance(got, Tensor) and expected.dim() == 0
            and got.dim() == 0 and expected.item() != 0 and math.isfinite(got.item())):
        return {}
    ratio = got.item() / expected.item()
    if abs(ratio + 1) < 1e-4:
        return {("sign",): "your result is minus the expected one: is a sign flipped?"}
    reasons = {}
    for name, value in inputs.items():
        for axis, size in enumerate(value.shape if isinstance(value, Tensor) else ()):
            for factor, verb in ((size, "summed"), (1 / size, "divided by its length twice, or "
                                                     "averaged where a sum belongs")):
                if size > 1 and abs(ratio - factor) < 1e-4 * max(1.0, factor):
                    reasons[name, axis, factor > 1] = (
                        f"your result is {ratio:.6g} times the expected one, and {size} is the "
                        f"length of axis {axis} of `{name}` (shape {tuple(value.shape)}): over "
                        f"that axis you {verb} where the expected result does the other.")
    return reasons


def explain_scalar(expected: Any, got: Any, inputs: dict[str, Any]) -> str | None:
    """The first explanation of a wrong scalar on one case (see `scalar_reasons`)."""
    return next(iter(scalar_reasons(expected, got, inputs).values()), None)


def explain_everywhere(cases: list[Case], expected: list[Any], outcomes: list[Outcome]
                       ) -> str | None:
    """An explanation of a wrong scalar that holds on every case the learner gets wrong (a sign, a
    sum over one named axis), worded for the first; None if it fits only some of them."""
    reasons = [scalar_reasons(want, outcome.value, case.kwargs)
               for case, want, outcome in zip(cases, expected, outcomes, strict=True)
               if outcome.error is not None or describe_difference(want, outcome.value)]
    if len(reasons) < 2:  # one wrong number fits too many stories (a clamp at 100 = 1/2 x 200)
        return None
    common = set.intersection(*(set(r) for r in reasons)) if reasons else set()
    return next((text for key, text in reasons[0].items() if key in common), None)


def passed(exercise: str, detail: str) -> None:
    print(f"\N{CHECK MARK} {exercise} passed: {detail}.")


def agree(exercise: str, case: str, reference: Any, oracle: Any, atol: float = ATOL) -> None:
    """Refuse to judge anyone if the reference solution and the oracle disagree."""
    problem = describe_difference(oracle, reference, atol=atol)
    if problem is not None:
        raise ReferenceOracleMismatch(
            f"minirlhf's reference for {exercise} disagrees with the independent oracle on "
            f"{case}: {problem} This is a bug in minirlhf, not in your code; please report it."
        )


# ---------------------------------------------------------------- the common check


def check_function(
    exercise: str,
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    oracle: Callable[..., Any],
    cases: list[Case],
    mistakes: list[Mistake],
    dims: str = "",
    atol: float = ATOL,
    grad_oracle: Callable[..., Any] | None = None,
) -> None:
    """Check a pure function of tensors on every case, by value and by gradient, against the
    reference and the oracle (`grad_oracle`, a differentiable independent formula, gives the
    gradient when `oracle` computes in plain floats).

    Also fails when the function changes its inputs in place, or when the reference's result
    carries a gradient and the learner's does not (a loss that cannot be backpropagated).
    """
    __tracebackhide__ = True
    expected = [expect(exercise, case, reference, oracle, grad_oracle, atol) for case in cases]
    outcomes = [run_case(fn, case.kwargs) for case in cases]
    for i in range(len(cases)):
        judge(exercise, cases, expected, outcomes, i, mistakes, dims, atol)
    names = "; ".join(case.name for case in cases)
    passed(exercise, f"{len(cases)} cases match the reference and an independent oracle, by "
           f"value{' and gradient' if expected[0][1] is not None else ''} ({names})")


def judge(exercise: str, cases: list[Case], expected: list[tuple[Any, Any]],
          outcomes: list[Outcome], i: int, mistakes: list[Mistake], dims: str, atol: float
          ) -> None:
    """Fail if the learner's outcome on case `i` differs from the expected value or gradient,
    with the hint the evidence of every case supports."""
    __tracebackhide__ = True
    case, (want, want_grads), got = cases[i], expected[i], outcomes[i]
    later = [*range(i, len(cases)), *range(i)]  # the failing case first: it rules out most
    hint = functools.partial(find_mistake, mistakes, [cases[j] for j in later],
                             [outcomes[j] for j in later])
    report = functools.partial(fail, exercise, case.name, inputs=case.kwargs, expected=want,
                               got=got.value, error=got.error)
    if got.error is not None:
        report(describe_error(got.error), hint() or crash_hint(got.error))
    problem = describe_difference(want, got.value, atol=atol, dims=dims)
    if problem is not None:
        report(problem, unstable(cases, expected, outcomes, i) or hint() or explain_everywhere(
            cases, [w for w, _ in expected], outcomes))
    modified = changed_inputs(case.kwargs, got.inputs)
    if modified:
        report(f"Your function changed its input {modified[0]!r} in place; compute a new "
               "tensor instead (avoid +=, [:] = and *_ methods).")
    if want_grads is not None and got.grads is None:
        report("Your result has no gradient, so the optimiser could not learn from it: did "
               "you use .item(), .detach(), torch.no_grad(), or build a new tensor with "
               "torch.tensor(...)?")
    problem = gradient_difference(want_grads, got.grads, atol)
    if problem is not None:
        report(problem, hint(with_grads=True) or DETACHED_HINT)


def expect(exercise: str, case: Case, reference: Callable[..., Any], oracle: Callable[..., Any],
           grad_oracle: Callable[..., Any] | None, atol: float) -> tuple[Any, Any]:
    """The oracle's answer and gradient on one case, after checking that the reference agrees."""
    answer = oracle(**clone_inputs(case.kwargs))
    ref = run_case(reference, case.kwargs)
    agree(exercise, case.name, ref.value, answer, atol=atol)
    if ref.grads is None:
        return answer, None
    grads = run_case(grad_oracle or oracle, case.kwargs).grads
    if grads is None:
        raise ReferenceOracleMismatch(f"the check of {exercise} has no differentiable oracle")
    agree(exercise, f"{case.name} (gradient)", torch.cat([g.flatten() for g in ref.grads.values()]),
          torch.cat([g.flatten() for g in grads.values()]), atol=atol)
    return answer, grads


DETACHED_HINT = ("a factor that carries gradient in the formula is detached in yours, or computed "
                 "from a detached copy (look for .detach(), .data, .item() or torch.no_grad()).")


def gradient_difference(expected: dict[str, Tensor] | None, got: dict[str, Tensor] | None,
                        atol: float) -> str | None:
    """None if the gradients match (or there are none to compare); otherwise how they differ."""
    for name, want in (expected or {}).items():
        problem = describe_difference(want, (got or {}).get(name), atol=atol)
        if problem is not None:
            zero = " It is zero everywhere." if not got[name].any() else ""
            return (f"Your result's value is right, but its gradient with respect to `{name}` is "
                    f"not, and training follows the gradient. {problem}{zero}")
    return None


def unstable(cases: list[Case], expected: list[tuple[Any, Any]], outcomes: list[Outcome],
             index: int) -> str | None:
    """The stable form, when the learner's result is wrong on a numerical-stability case and
    right on every other case: a formula right in exact arithmetic that overflows in float32."""
    if not cases[index].stability:
        return None
    for case, (want, _), outcome in zip(cases, expected, outcomes, strict=True):
        if not case.stability and (outcome.error is not None
                                   or describe_difference(want, outcome.value) is not None):
            return None
    return ("this is a numerical-stability case: your results are right on the other cases, and "
            "your formula may be right in exact arithmetic, but with these inputs a step of it "
            f"overflows or underflows in float32. {cases[index].stability}")
