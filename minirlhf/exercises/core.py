"""The machinery every check shares: call the learner's code, compare, name the likely mistake.

A check feeds the learner's function a few seeded `Case`s (several shapes and edge cases). For
each, it computes the answer twice, with the library's reference solution and with an independent
oracle (a naive loop, `torch.distributions`, numbers worked by hand), and insists those two agree
before it judges the learner. When the learner's answer differs, it says how (shapes, values, the
first mismatching position) and replays each known `Mistake` on the same inputs: if one of them
reproduces the learner's answer (or error), its hint is shown.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.loading import PRINTABLE_VOCAB, load_tiny_model

ATOL = 1e-5
RTOL = 1e-4


class ExerciseCheckError(AssertionError):
    """The learner's implementation disagrees with the reference; the message says how."""


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


# ---------------------------------------------------------------- calling the learner's code


def clone_inputs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fresh copies of the tensors (gradients kept), so no call can change another call's input."""
    return {
        key: value.detach().clone().requires_grad_(value.requires_grad)
        if isinstance(value, Tensor)
        else value
        for key, value in kwargs.items()
    }


def call(
    fn: Callable[..., Any], kwargs: dict[str, Any], positional: bool = False
) -> tuple[Any, BaseException | None]:
    """`fn(**kwargs)` (or `fn(*kwargs.values())`) and the exception it raised, if any.

    The learner's functions are called positionally, so their parameters may have other names.
    """
    try:
        return (fn(*kwargs.values()) if positional else fn(**kwargs)), None
    except Exception as error:  # the learner's code may raise anything; report it, don't crash
        return None, error


def describe_error(error: BaseException) -> str:
    if isinstance(error, NotImplementedError):
        return "It raised NotImplementedError: replace `raise NotImplementedError()` with code."
    return f"It raised {type(error).__name__}: {error}"


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


def same_outcome(
    got: Any, error: BaseException | None, other: Any, other_error: BaseException | None
) -> bool:
    """Whether two calls ended the same way: the same error, or results that match."""
    if error is not None or other_error is not None:
        return (
            error is not None
            and other_error is not None
            and type(error) is type(other_error)
            and str(error) == str(other_error)
        )
    if isinstance(other, Tensor) and isinstance(got, Tensor):
        return got.shape == other.shape and describe_difference(other, got) is None
    return False


def find_mistake(mistakes: list[Mistake], kwargs: dict[str, Any], got: Any,
                 error: BaseException | None) -> str | None:
    """The hint of the first mistake that reproduces the learner's result (or error)."""
    for mistake in mistakes:
        imitated, imitated_error = call(mistake.imitate, clone_inputs(kwargs))
        if same_outcome(got, error, imitated, imitated_error):
            return mistake.hint
    return None


# ---------------------------------------------------------------- reporting


def fail(exercise: str, case: str, problem: str, hint: str | None = None) -> None:
    """Raise the error a learner sees: what was tested, what differed, and the likely mistake."""
    __tracebackhide__ = True  # pytest and IPython show the message, not this frame
    lines = [f"{exercise} is not right yet.", f"  Test case: {case}.", f"  {problem}"]
    if hint:
        lines.append(f"  Likely mistake: {hint}")
    raise ExerciseCheckError("\n".join(lines))


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
        if error is not None:
            fail(exercise, case.name, describe_error(error),
                 find_mistake(mistakes, case.kwargs, got, error))
        problem = describe_difference(expected, got, atol=atol, dims=dims)
        if problem is not None:
            fail(exercise, case.name, problem, find_mistake(mistakes, case.kwargs, got, error))
        modified = changed_inputs(case.kwargs, inputs)
        if modified:
            fail(exercise, case.name, f"Your function changed its input {modified[0]!r} in "
                 "place; compute a new tensor instead (avoid +=, [:] = and *_ methods).")
        if isinstance(ref, Tensor) and ref.requires_grad and not got.requires_grad:
            fail(exercise, case.name, "Your result has no gradient, so the optimiser could not "
                 "learn from it: did you use .item(), .detach(), torch.no_grad(), or build a new "
                 "tensor with torch.tensor(...)?")
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


CHAR_VOCAB = PRINTABLE_VOCAB
"""GPT-2's token ids 0..93 are the 94 printable one-character tokens '!'..'~' ('.' is 13)."""


def load_char_model(
    n_layers: int = 1, d_model: int = 32, n_heads: int = 2, seed: int = 0
) -> HookedTransformer:
    """A tiny random model whose vocabulary is the 94 printable one-character GPT-2 tokens.

    It keeps GPT-2's tokenizer, so prompts must be made of characters that tokenize to single
    in-vocabulary tokens (such as "a"), with prepend_bos=False (BOS, 50256, is out of its
    vocabulary). Its softmaxes are over 94 tokens instead of 50,257, so it trains in a fraction of
    a second per phase on a CPU and a check can afford thousands of samples.
    """
    return load_tiny_model(n_layers, d_model, n_heads, n_ctx=64, seed=seed, d_vocab=CHAR_VOCAB)
