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
from transformer_lens import HookedTransformer

from minirlhf.exercises.reporting import (
    call,
    clone_inputs,
    crash_hint,
    describe_error,
    fail,
)
from minirlhf.runtime.loading import PRINTABLE_VOCAB, load_tiny_model

ATOL = 1e-5
RTOL = 1e-4


class ReferenceOracleMismatch(RuntimeError):
    """The library's reference and the independent oracle disagree: a bug in minirlhf itself."""


@dataclass
class Case:
    """One set of inputs fed to the function under test (keyword arguments) and its name."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Mistake:
    """A common mistake: a function that makes it, and the hint shown when the learner's matches."""

    hint: str
    imitate: Callable[..., Any]


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


def find_mistake(mistakes: list[Mistake], kwargs: dict[str, Any], got: Any,
                 error: BaseException | None) -> str | None:
    """The hint of the first mistake that reproduces the learner's result (or error), else a hint
    for a crash whose message is a known one."""
    for mistake in mistakes:
        imitated, imitated_error = call(mistake.imitate, clone_inputs(kwargs), positional=True)
        if outcome_difference(got, error, imitated, imitated_error) is None:
            return mistake.hint
    return crash_hint(error)


def explain_scalar(expected: Any, got: Any, inputs: dict[str, Any]) -> str | None:
    """For a wrong scalar: whether it is off by a factor that is an axis length of an input (a
    sum where a mean belongs, or a mean over the wrong axes), or by its sign."""
    if not (isinstance(expected, Tensor) and isinstance(got, Tensor) and expected.dim() == 0
            and got.dim() == 0 and expected.item() != 0 and math.isfinite(got.item())):
        return None
    ratio = got.item() / expected.item()
    if abs(ratio + 1) < 1e-4:
        return "your result is minus the expected one: is a sign flipped?"
    for name, value in inputs.items():
        if not isinstance(value, Tensor):
            continue
        for axis, size in enumerate(value.shape):
            for factor, verb in ((size, "summed"), (1 / size, "divided by its length twice, or "
                                                     "averaged where a sum belongs")):
                if size > 1 and abs(ratio - factor) < 1e-4 * max(1.0, factor):
                    return (f"your result is {ratio:.6g} times the expected one, and {size} is "
                            f"the length of axis {axis} of `{name}` (shape "
                            f"{tuple(value.shape)}): over that axis you {verb} where the "
                            "expected result does the other.")
    return None


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
) -> None:
    """Check a pure function of tensors on every case against the reference and the oracle.

    Also fails when the function changes its inputs in place, or when the reference's result
    carries a gradient and the learner's does not (a loss that cannot be backpropagated).
    """
    __tracebackhide__ = True
    for case in cases:
        expected = oracle(**clone_inputs(case.kwargs))
        ref = reference(**clone_inputs(case.kwargs))
        agree(exercise, case.name, ref, expected, atol=atol)
        inputs = clone_inputs(case.kwargs)
        got, error = call(fn, inputs, positional=True)
        report = functools.partial(fail, exercise, case.name, inputs=case.kwargs,
                                   expected=expected, got=got, error=error)
        if error is not None:
            report(describe_error(error), find_mistake(mistakes, case.kwargs, got, error))
        problem = describe_difference(expected, got, atol=atol, dims=dims)
        if problem is not None:
            hint = find_mistake(mistakes, case.kwargs, got, error)
            report(problem, hint or explain_scalar(expected, got, case.kwargs))
        modified = changed_inputs(case.kwargs, inputs)
        if modified:
            report(f"Your function changed its input {modified[0]!r} in place; compute a new "
                   "tensor instead (avoid +=, [:] = and *_ methods).")
        if isinstance(ref, Tensor) and ref.requires_grad and not got.requires_grad:
            report("Your result has no gradient, so the optimiser could not learn from it: did "
                   "you use .item(), .detach(), torch.no_grad(), or build a new tensor with "
                   "torch.tensor(...)?")
    names = "; ".join(case.name for case in cases)
    passed(exercise, f"{len(cases)} cases match the reference and an independent oracle ({names})")


# ---------------------------------------------------------------- inputs


def single_threaded(check: Callable[..., None]) -> Callable[..., None]:
    """Run a check on one CPU thread: tiny models run several times faster without the hand-offs
    between threads (far more so on a busy machine). The caller's thread count is restored."""

    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0, grad: bool = False) -> Tensor:
    """Seeded standard-normal floats (optionally a leaf that requires grad)."""
    return (torch.randn(*shape, generator=seeded(seed)) * scale).requires_grad_(grad)


def load_char_model(
    n_layers: int = 1, d_model: int = 32, n_heads: int = 2, seed: int = 0
) -> HookedTransformer:
    """A tiny random model whose vocabulary is the 94 printable one-character GPT-2 tokens
    (ids 0..93 are '!'..'~'; '.' is 13).

    It keeps GPT-2's tokenizer, so prompts must be made of characters that tokenize to single
    in-vocabulary tokens (such as "a"), with prepend_bos=False (BOS, 50256, is out of its
    vocabulary). Its softmaxes are over 94 tokens instead of 50,257, so it trains in a fraction of
    a second per phase on a CPU and a check can afford thousands of samples.
    """
    return load_tiny_model(n_layers, d_model, n_heads, n_ctx=64, seed=seed, d_vocab=PRINTABLE_VOCAB)

