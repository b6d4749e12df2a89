"""Calling the learner's code, and a failure report the learner can act on.

When the learner's code raises, the check's error is chained to it, with the traceback trimmed to
the learner's own frames (the checker's frames dropped), and the line that raised is quoted in the
message. The failing case's inputs are printed as code when they are small, and `last_failure()`
hands the whole case back to re-run by hand.
"""

import functools
import re
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

EXERCISES_DIR = Path(__file__).resolve().parent
LIBRARY_DIR = EXERCISES_DIR.parent
SMALL = 40
"""Inputs with at most this many numbers are printed as code in a failure message."""


class ExerciseCheckError(AssertionError):
    """The learner's implementation disagrees with the reference; the message says how."""


@dataclass
class Failure:
    """The case a check failed on, kept so the learner can re-run it: `last_failure()`."""

    exercise: str
    case: str
    inputs: dict[str, Any]
    """The arguments, in the order the check passed them (positionally) to the learner's code."""
    expected: Any = None
    """The independent oracle's answer, when the check has one."""
    got: Any = None
    """What the learner's code returned (None if it raised)."""
    error: BaseException | None = None
    """What the learner's code raised, if it did."""
    keywords: tuple[str, ...] = ()
    """The inputs the check passed by name (the others go by position)."""

    def rerun(self, fn: Callable[..., Any]) -> Any:
        """Call `fn` on fresh copies of the failing inputs, as the check did, and return its result
        (exceptions propagate with their full traceback)."""
        inputs = clone_inputs(self.inputs)
        by_name = {k: inputs.pop(k) for k in self.keywords}
        return fn(*inputs.values(), **by_name)

    def as_code(self) -> str:
        """The inputs as Python lines to paste into a cell (big tensors by reference)."""
        lines = [f"{name} = {to_code(value, name)}" for name, value in self.inputs.items()]
        return "\n".join(lines)


_last_failure: list[Failure] = []


def last_failure() -> Failure | None:
    """The case the latest failed check ran, to re-run by hand: `last_failure().rerun(my_fn)`, or
    `last_failure().inputs` for the arguments themselves."""
    return _last_failure[-1] if _last_failure else None


def to_code(value: Any, name: str = "") -> str:
    """Python source that rebuilds `value` when it is small; a pointer to it when it is not."""
    if isinstance(value, Tensor):
        if value.numel() <= SMALL:
            return _tensor_code(value)
        shape = ", ".join(map(str, value.shape))
        return (f'exercises.last_failure().inputs["{name}"]  # {str(value.dtype)[6:]} of shape '
                f"({shape})")
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float) for v in value):
        text = repr(value)
        if len(text) <= 300:
            return text
    return f'exercises.last_failure().inputs["{name}"]  # a {type(value).__name__}'


def _tensor_code(value: Tensor) -> str:
    data = value.detach().cpu().tolist()
    if value.is_floating_point():
        data = _round(data)
    default = torch.float32 if value.is_floating_point() else torch.int64
    extras = "" if value.dtype in (default, torch.bool) else f", dtype={value.dtype}"
    if value.requires_grad:
        extras += ", requires_grad=True"
    return f"torch.tensor({data}{extras})"


def _round(data: Any) -> Any:
    """Floats to 6 significant digits (what a float32 holds), in nested lists."""
    if isinstance(data, list):
        return [_round(x) for x in data]
    return float(f"{data:.6g}")


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


def _is_checker_frame(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(EXERCISES_DIR)


def _is_library_frame(filename: str) -> bool:
    """A frame of minirlhf, torch, TransformerLens or Python itself: not the learner's code."""
    path = Path(filename).resolve()
    roots = [LIBRARY_DIR] + [Path(sysconfig.get_paths()[key]).resolve()
                              for key in ("stdlib", "purelib", "platlib")]
    return filename.startswith("<frozen") or any(path.is_relative_to(r) for r in roots)


def learner_traceback(error: BaseException) -> TracebackType | None:
    """The error's traceback without the checker's frames at its top (where `call` caught it)."""
    tb = error.__traceback__
    while tb is not None and _is_checker_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def learner_line(error: BaseException) -> str | None:
    """Where in the learner's own code the error arose: its deepest frame outside the libraries."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not _is_checker_frame(f.filename) and not _is_library_frame(f.filename)]
    if not frames:
        return None
    frame = frames[-1]
    code = f"\n      {frame.line.strip()}" if frame.line else ""
    return f"line {frame.lineno}, in {frame.name}{code}"


def describe_error(error: BaseException) -> str:
    if isinstance(error, NotImplementedError):
        return "It raised NotImplementedError: replace `raise NotImplementedError()` with code."
    where = learner_line(error)
    at = f"\n  Your code raised it at {where}" if where else ""
    return (f"It raised {type(error).__name__}: {error}{at}\n  (Your traceback is printed above "
            "this message.)")


CRASH_HINTS = [
    (r"prob_dist must be 1 or 2 dim",
     "torch.multinomial takes probabilities of shape (batch, d_vocab): take the logits at the "
     "last position only, logits[:, -1], before the softmax."),
    (r"cannot access local variable|referenced before assignment|name '\w+' is not defined",
     "a variable assigned inside a hook function is local to the hook: create it before the "
     "hook runs (`values = None`) and give the hook `nonlocal values` (in general, `nonlocal "
     "name`) on its first line."),
    (r"Index tensor must have the same number of dimensions as input tensor",
     "gather needs an index with as many dimensions as the tensor it reads: add a trailing "
     "axis, tokens[..., None], then .squeeze(-1) the result."),
    (r"The size of tensor a \(\d+\) must match the size of tensor b \(\d+\)",
     "two tensors' shapes do not line up on the line shown: print their .shape there. A slice "
     "that forgot the batch axis (`x[a:b]` instead of `x[:, a:b]`) is the usual cause."),
]
"""(pattern in the error message, hint): for crashes no `Mistake` reproduces."""


def crash_hint(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return next((hint for pattern, hint in CRASH_HINTS if re.search(pattern, str(error))), None)


# ---------------------------------------------------------------- reporting


def fail(exercise: str, case: str, problem: str, hint: str | None = None, *,
         inputs: dict[str, Any] | None = None, keywords: tuple[str, ...] = (),
         expected: Any = None, got: Any = None, error: BaseException | None = None,
         rerun: str | None = None) -> None:
    """Raise the error a learner sees: what was tested, what differed, the likely mistake, the
    inputs (as code when small), chained to the learner's own traceback when their code raised.

    Args:
        rerun: the code that re-runs the case, when `last_failure().rerun(exercise)` does not
            (a class to build before calling it, a method).
    """
    __tracebackhide__ = True  # pytest and IPython show the message, not this frame
    lines = [f"{exercise} is not right yet.", f"  Test case: {case}.", f"  {problem}"]
    if hint:
        lines.append(f"  Likely mistake: {hint}")
    _last_failure[:] = [Failure(exercise, case, dict(inputs or {}), expected, got, error, keywords)]
    if inputs:
        code = last_failure().as_code().replace("\n", "\n      ")
        lines += ["  The inputs of this case (also `exercises.last_failure().inputs`):",
                  f"      {code}",
                  f"  Re-run it: `{rerun or f'exercises.last_failure().rerun({exercise})'}`."]
        if isinstance(expected, Tensor) and expected.numel() <= SMALL:
            lines.append(f"  Expected result: {_tensor_code(expected)}")
    message = ExerciseCheckError("\n".join(lines))
    if error is None or isinstance(error, NotImplementedError):
        raise message from None
    raise message from error.with_traceback(learner_traceback(error))


def learner_facing(check: Callable[..., None]) -> Callable[..., None]:
    """Decorate a check so that its failure's traceback holds no frame of the checker: the learner
    sees their own traceback (chained, when their code raised), then the message."""

    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        __tracebackhide__ = True
        try:
            return check(*args, **kwargs)
        except ExerciseCheckError as error:
            raise error.with_traceback(None) from error.__cause__

    return wrapper
