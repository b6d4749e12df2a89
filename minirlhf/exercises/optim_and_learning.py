"""Checks for notebook 4: the optimiser's parameter groups and the LR schedule.

The schedule's oracle is a table of multipliers worked out by hand. The learning phase's check
is in `learning_phase.py`.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from minirlhf.exercises.core import Mistake, passed
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.optim import get_lr_scale, get_optimizer, get_optimizer_and_scheduler

# ---------------------------------------------------------------- the optimiser


class _TinyPolicy(nn.Module):
    """Stands in for TransformerWithValueHead: a `base_model` and a `value_head`."""

    def __init__(self):
        super().__init__()
        self.base_model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
        self.value_head = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))


def _check_optimizer(exercise: str, case: str, optimizer: Any, model: nn.Module, base_lr: float,
                     head_lr: float, inputs: dict[str, Any]) -> None:
    """The optimiser's class, groups, their order and learning rates; `inputs` (what built it)
    is the case a failure records."""
    report = functools.partial(fail, exercise, case, inputs=inputs)
    if not isinstance(optimizer, torch.optim.AdamW):
        hint = "torch.optim.Adam's weight_decay is L2 in the gradient; use AdamW."
        report(f"Expected a torch.optim.AdamW, got {type(optimizer).__name__}.",
               hint if isinstance(optimizer, torch.optim.Adam) else None)
    groups = optimizer.param_groups
    if len(groups) != 2:
        report(f"Expected 2 parameter groups (transformer, value head), got "
               f"{len(groups)}.", "give the transformer and the value head a group each, with "
               "their own learning rates.")
    if not all(group["maximize"] for group in groups):
        report("The optimiser minimises.", "the trainer maximises the RLHF "
               "objective: pass maximize=True to AdamW.")
    base_ids = {id(p) for p in model.base_model.parameters()}
    head_ids = {id(p) for p in model.value_head.parameters()}
    got = [{id(p) for p in group["params"]} for group in groups]
    if got == [head_ids, base_ids]:
        report("The groups are in the wrong order.", "put the transformer's "
               "parameters (base_lr) first and the value head's (head_lr) second.")
    if got[0] != base_ids or got[1] != head_ids:
        hint = None
        if got[0] == base_ids | head_ids:
            hint = ("model.parameters() includes the value head: use model.base_model.parameters() "
                    "for the first group, so no parameter appears twice.")
        report("The first group should hold exactly model.base_model's parameters "
               "and the second exactly model.value_head's.", hint)
    lrs = [group.get("initial_lr", group["lr"]) for group in groups]  # before any scheduling
    if lrs != [base_lr, head_lr]:
        hint = "base_lr and head_lr are swapped." if lrs == [head_lr, base_lr] else None
        report(f"Expected learning rates [{base_lr}, {head_lr}], got {lrs}.", hint)


@learner_facing
def check_get_optimizer(fn: Callable[..., torch.optim.Optimizer]) -> None:
    """Check `fn(model, base_lr, head_lr)`: AdamW, maximize=True, one group per learning rate."""
    exercise = "get_optimizer"
    case = "base_lr=2e-5, head_lr=5e-4"
    model = _TinyPolicy()
    inputs = {"model": model, "base_lr": 2e-5, "head_lr": 5e-4}
    _check_optimizer(exercise, case, get_optimizer(model, 2e-5, 5e-4), model, 2e-5, 5e-4, inputs)
    optimizer, error = call(fn, inputs, True)
    if error is not None:
        hint = None
        if "more than one parameter group" in str(error):
            hint = ("model.parameters() includes the value head: use "
                    "model.base_model.parameters() for the first group.")
        fail(exercise, case, describe_error(error), hint or crash_hint(error), error=error,
             inputs=inputs)
    _check_optimizer(exercise, case, optimizer, model, 2e-5, 5e-4, inputs)
    passed(exercise, "AdamW with maximize=True, base_model at base_lr and value_head at head_lr")


# ---------------------------------------------------------------- the learning-rate schedule

# (warmup_steps, total_phases, final_scale) -> multipliers for phases 0, 1, ..., worked by hand.
LR_SCALE_TABLE = {
    (4, 10, 0.1): [0.25, 0.5, 0.75, 1.0, 1.0, 0.82, 0.64, 0.46, 0.28, 0.1],
    (0, 5, 0.5): [1.0, 0.875, 0.75, 0.625, 0.5],
    (2, 3, 0.0): [0.5, 1.0, 1.0],
    (1, 4, 0.4): [1.0, 1.0, 0.7, 0.4],
}


def _original_lr_scale(phase, warmup_steps, total_phases, final_scale):
    """The original design's schedule, with both of its bugs (docs/seeds.md)."""
    if phase < warmup_steps:
        return phase / warmup_steps
    return 1 - (1 - final_scale) * (phase - warmup_steps) / (total_phases - warmup_steps)


def _from_warmup_end(phase, warmup_steps, total_phases, final_scale):
    if phase < warmup_steps:
        return (phase + 1) / warmup_steps
    return 1 - (1 - final_scale) * (phase - warmup_steps) / (total_phases - warmup_steps)


LR_MISTAKES = [
    Mistake("two bugs at once: LR 0 in the first warmup phase (use (phase + 1) / warmup_steps), "
            "and a decay that stops short of final_scale at the last phase (divide by "
            "total_phases - 1 - warmup_steps).", _original_lr_scale),
    Mistake("the first warmup phase gets LR 0, so phase 0 learns nothing (phase / "
            "warmup_steps): use (phase + 1) / warmup_steps.",
            lambda phase, warmup_steps, total_phases, final_scale: phase / warmup_steps
            if phase < warmup_steps else get_lr_scale(phase, warmup_steps, total_phases,
                                                      final_scale)),
    Mistake("the decay does not reach final_scale at the last phase (total_phases - 1): divide "
            "by total_phases - 1 - warmup_steps, not total_phases - warmup_steps.",
            _from_warmup_end),
]


def _schedule(fn: Callable[..., float], warmup: int, total: int, final: float):
    """The multipliers of every phase, or the first phase's error."""
    scales = []
    for phase in range(total):
        kwargs = {"phase": phase, "warmup_steps": warmup, "total_phases": total,
                  "final_scale": final}
        scale, error = call(fn, kwargs, positional=True)
        if error is not None:
            return scales, (phase, error)
        scales.append(scale)
    return scales, None


@learner_facing
def check_get_lr_scale(fn: Callable[..., float]) -> None:
    """Check `fn(phase, warmup_steps, total_phases, final_scale)` against a hand-worked table."""
    exercise = "get_lr_scale"
    for (warmup, total, final), expected in LR_SCALE_TABLE.items():
        schedule = f"warmup_steps={warmup}, total_phases={total}, final_scale={final}"
        reference, _ = _schedule(get_lr_scale, warmup, total, final)
        assert (problem := _schedule_difference(expected, reference)) is None, problem
        got, error = _schedule(fn, warmup, total, final)
        if error is not None:
            phase, error = error
            hint = None
            if isinstance(error, ZeroDivisionError) and warmup == 0:
                hint = "warmup_steps=0 means no warmup: don't divide by it."
            inputs = {"phase": phase, "warmup_steps": warmup, "total_phases": total,
                      "final_scale": final}
            fail(exercise, f"phase={phase}, {schedule}", describe_error(error),
                 hint or crash_hint(error), inputs=inputs, error=error)
        wrong = [p for p, (a, b) in enumerate(zip(got, expected, strict=True))
                 if not isinstance(a, int | float) or abs(a - b) > 1e-6]
        if wrong:
            phase = wrong[0]
            hint = next((m.hint for m in LR_MISTAKES if _schedule_difference(
                _schedule(m.imitate, warmup, total, final)[0], got) is None), None)
            inputs = {"phase": phase, "warmup_steps": warmup, "total_phases": total,
                      "final_scale": final}
            fail(exercise, f"phase={phase}, {schedule}", f"Expected {expected[phase]:.4g}, got "
                 f"{got[phase]!r} (expected schedule {expected}, got "
                 f"{[round(g, 4) if isinstance(g, float) else g for g in got]}).", hint,
                 inputs=inputs, expected=expected[phase], got=got[phase])
    passed(exercise, f"{sum(map(len, LR_SCALE_TABLE.values()))} phases of 4 schedules (with and "
           "without warmup) match a hand-worked table and the reference")


def _schedule_difference(expected: list, got: list) -> str | None:
    """None if two lists of multipliers agree to 1e-6, else the first phase where they differ."""
    if len(expected) != len(got):
        return f"{len(got)} phases, expected {len(expected)}"
    for phase, (a, b) in enumerate(zip(expected, got, strict=True)):
        if not isinstance(b, int | float) or abs(a - b) >= 1e-6:
            return f"phase {phase}: {b!r}, expected {a}"
    return None


@learner_facing
def check_get_optimizer_and_scheduler(fn: Callable[..., tuple]) -> None:
    """Check `fn(model, base_lr, head_lr, warmup_steps, total_phases, final_scale)`: the optimiser
    and a scheduler that, stepped once per phase, sets each group's LR to its base times the scale.
    """
    exercise = "get_optimizer_and_scheduler"
    (warmup, total, final), scales = next(iter(LR_SCALE_TABLE.items()))
    kwargs = {"base_lr": 1e-3, "head_lr": 1e-2, "warmup_steps": warmup, "total_phases": total,
              "final_scale": final}
    case = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    for candidate in (get_optimizer_and_scheduler, fn):
        model = _TinyPolicy()
        result, error = call(candidate, {"model": model, **kwargs}, positional=True)
        if error is not None:
            hint = None
            if "scheulder" in str(error) or "lamda" in str(error):
                hint = ("check the spelling (`lr_scheulder` and `lr_lamda` are easy typos): "
                        "torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=...).")
            fail(exercise, case, describe_error(error), hint or crash_hint(error), error=error,
                 inputs={"model": model, **kwargs})
        optimizer, scheduler = result
        _check_optimizer(exercise, case, optimizer, model, 1e-3, 1e-2, {"model": model, **kwargs})
        for phase, scale in enumerate(scales):
            lrs = [group["lr"] for group in optimizer.param_groups]
            expected = [1e-3 * scale, 1e-2 * scale]
            if any(abs(a - b) > 1e-12 for a, b in zip(lrs, expected, strict=True)):
                hint = None
                if phase == 0 and lrs[0] == 0:
                    hint = "LR 0 in the first phase: the warmup should start at 1 / warmup_steps."
                fail(exercise, f"{case}, after {phase} scheduler steps", f"Expected LRs "
                     f"{expected} (scale {scale}), got {lrs}.", hint,
                     inputs={"model": _TinyPolicy(), **kwargs})
            optimizer.step()  # no gradients: changes nothing, but keeps the step order right
            scheduler.step()
    passed(exercise, f"the LRs of both groups over {total} phases follow the schedule")
