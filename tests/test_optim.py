"""Tests for minirlhf.optim: the two-group AdamW and the warmup + linear decay schedule.

The schedule is checked against values worked by hand, on `get_lr_scale` alone and through a real
`LambdaLR` on a real optimiser (reading the LR the way the trainer does: before stepping). The
same checks reject the seed's scheduler, whose first phase had LR 0.
"""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from minirlhf.optim import get_lr_scale, get_optimizer, get_optimizer_and_scheduler

BASE_LR, HEAD_LR = 1e-3, 5e-2


class PolicyWithHead(nn.Module):
    """The two attributes `get_optimizer` reads, as small as can be."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base_model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
        self.value_head = nn.Linear(4, 1)


# ---------------------------------------------------------------- the schedule

# Warmup 2, 6 phases, final 0.1: warmup reaches 1/2 then 1; decay goes from 1 at phase 2 to 0.1 at
# phase 5 in 3 equal steps of 0.3.
HAND_WORKED = {
    (2, 6, 0.1): [0.5, 1.0, 1.0, 0.7, 0.4, 0.1],
    (0, 4, 0.4): [1.0, 0.8, 0.6, 0.4],
    (4, 5, 0.5): [0.25, 0.5, 0.75, 1.0, 1.0],
    (0, 1, 0.1): [1.0],
    (1, 3, 0.0): [1.0, 1.0, 0.0],
}


def schedule_matches(lr_scale: Callable) -> bool:
    for (warmup_steps, total_phases, final_scale), expected in HAND_WORKED.items():
        scales = [lr_scale(p, warmup_steps, total_phases, final_scale) for p in range(total_phases)]
        if scales != pytest.approx(expected, abs=1e-9):
            return False
    return True


def seed_lr_scale(phase, warmup_steps, total_phases, final_scale):
    """The seed's lambda: step / warmup_steps is 0 in the first phase; decay never reaches final."""
    if phase < warmup_steps:
        return phase / warmup_steps
    return 1 - (1 - final_scale) * (phase - warmup_steps) / (total_phases - warmup_steps)


def decay_overshoots(phase, warmup_steps, total_phases, final_scale):
    """Warmup fixed, but the decay is divided by one phase too few."""
    if phase < warmup_steps:
        return (phase + 1) / warmup_steps
    progress = (phase - warmup_steps) / max(1, total_phases - 2 - warmup_steps)
    return 1.0 - (1.0 - final_scale) * progress


def test_lr_scale_hand_worked():
    assert schedule_matches(get_lr_scale)


@pytest.mark.parametrize("wrong", [seed_lr_scale, decay_overshoots])
def test_schedule_check_rejects_wrong_versions(wrong):
    assert not schedule_matches(wrong)


def lrs_through_lambda_lr(make: Callable) -> bool:
    """Drive a real LambdaLR like the trainer (read both groups' LR, then step) for 6 phases."""
    optimizer, scheduler = make(PolicyWithHead(), BASE_LR, HEAD_LR, 2, 6, 0.1)
    for expected in HAND_WORKED[(2, 6, 0.1)]:
        base_lr, head_lr = (group["lr"] for group in optimizer.param_groups)
        if base_lr == 0 or head_lr == 0:  # a phase that cannot learn
            return False
        if base_lr != pytest.approx(BASE_LR * expected) or head_lr != pytest.approx(
            HEAD_LR * expected
        ):
            return False
        optimizer.step()  # (no gradients: a no-op, but keeps LambdaLR from warning)
        scheduler.step()
    return True


def seed_optimizer_and_scheduler(model, base_lr, head_lr, warmup_steps, total_phases, final_scale):
    optimizer = get_optimizer(model, base_lr, head_lr)

    def lr_lambda(phase):
        return seed_lr_scale(phase, warmup_steps, total_phases, final_scale)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)


def test_scheduler_first_lr_is_not_zero():
    assert lrs_through_lambda_lr(get_optimizer_and_scheduler)


def test_scheduler_check_rejects_the_seeds_lr_zero_first_step():
    assert not lrs_through_lambda_lr(seed_optimizer_and_scheduler)


# ---------------------------------------------------------------- the optimiser


def optimizer_is_correct(make: Callable) -> bool:
    """Two groups (trunk at base_lr, head at head_lr), AdamW, and it *maximises*."""
    model = PolicyWithHead()
    optimizer = make(model, BASE_LR, HEAD_LR)
    if not isinstance(optimizer, torch.optim.AdamW) or len(optimizer.param_groups) != 2:
        return False
    base_group, head_group = optimizer.param_groups
    if [id(p) for p in base_group["params"]] != [id(p) for p in model.base_model.parameters()]:
        return False
    if [id(p) for p in head_group["params"]] != [id(p) for p in model.value_head.parameters()]:
        return False
    if base_group["lr"] != BASE_LR or head_group["lr"] != HEAD_LR:
        return False
    if not all(group["maximize"] for group in optimizer.param_groups):
        return False
    # One step on an objective must increase it.
    inputs = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    def objective():
        return model.value_head(model.base_model(inputs)).mean()

    before = objective()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    return objective().item() > before.item()


def optimizer_minimising(model, base_lr, head_lr):
    """Forgot maximize=True: the trainer would minimise the RLHF objective."""
    return torch.optim.AdamW(
        [{"params": model.base_model.parameters(), "lr": base_lr},
         {"params": model.value_head.parameters(), "lr": head_lr}]
    )


def optimizer_lrs_swapped(model, base_lr, head_lr):
    return get_optimizer(model, head_lr, base_lr)


def optimizer_one_group(model, base_lr, head_lr):
    return torch.optim.AdamW(model.parameters(), lr=base_lr, maximize=True)


def test_get_optimizer():
    assert optimizer_is_correct(get_optimizer)


@pytest.mark.parametrize(
    "wrong", [optimizer_minimising, optimizer_lrs_swapped, optimizer_one_group]
)
def test_optimizer_check_rejects_wrong_versions(wrong):
    assert not optimizer_is_correct(wrong)
