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


def schedule_mismatch(lr_scale: Callable) -> str | None:
    """None if lr_scale gives the hand-worked scales of every setting, else the first difference."""
    for (warmup_steps, total_phases, final_scale), expected in HAND_WORKED.items():
        scales = [lr_scale(p, warmup_steps, total_phases, final_scale) for p in range(total_phases)]
        if scales != pytest.approx(expected, abs=1e-9):
            return (f"warmup_steps={warmup_steps}, total_phases={total_phases}, "
                    f"final_scale={final_scale}: got {scales}, expected {expected}")
    return None


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
    problem = schedule_mismatch(get_lr_scale)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [seed_lr_scale, decay_overshoots])
def test_schedule_check_rejects_wrong_versions(wrong):
    assert schedule_mismatch(wrong) is not None


def lambda_lr_problem(make: Callable) -> str | None:
    """Drive a real LambdaLR like the trainer (read both groups' LR, then step) for 6 phases:
    None if every phase has the hand-worked LRs, else the first phase that does not."""
    optimizer, scheduler = make(PolicyWithHead(), BASE_LR, HEAD_LR, 2, 6, 0.1)
    for phase, expected in enumerate(HAND_WORKED[(2, 6, 0.1)]):
        base_lr, head_lr = (group["lr"] for group in optimizer.param_groups)
        if base_lr == 0 or head_lr == 0:  # a phase that cannot learn
            return f"phase {phase}: LR 0 (base {base_lr}, head {head_lr})"
        if base_lr != pytest.approx(BASE_LR * expected) or head_lr != pytest.approx(
            HEAD_LR * expected
        ):
            return (f"phase {phase}: LRs {base_lr}, {head_lr}, expected "
                    f"{BASE_LR * expected}, {HEAD_LR * expected}")
        optimizer.step()  # (no gradients: a no-op, but keeps LambdaLR from warning)
        scheduler.step()
    return None


def seed_optimizer_and_scheduler(model, base_lr, head_lr, warmup_steps, total_phases, final_scale):
    optimizer = get_optimizer(model, base_lr, head_lr)

    def lr_lambda(phase):
        return seed_lr_scale(phase, warmup_steps, total_phases, final_scale)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)


def test_scheduler_first_lr_is_not_zero():
    problem = lambda_lr_problem(get_optimizer_and_scheduler)
    assert problem is None, problem


def test_scheduler_check_rejects_the_seeds_lr_zero_first_step():
    assert lambda_lr_problem(seed_optimizer_and_scheduler) is not None


# ---------------------------------------------------------------- the optimiser


def optimizer_problem(make: Callable) -> str | None:
    """None if the optimiser has two groups (trunk at base_lr, head at head_lr), is AdamW and
    *maximises*; else what it gets wrong."""
    model = PolicyWithHead()
    optimizer = make(model, BASE_LR, HEAD_LR)
    if not isinstance(optimizer, torch.optim.AdamW) or len(optimizer.param_groups) != 2:
        return (f"{type(optimizer).__name__} with {len(optimizer.param_groups)} groups, "
                "expected AdamW with 2")
    base_group, head_group = optimizer.param_groups
    if [id(p) for p in base_group["params"]] != [id(p) for p in model.base_model.parameters()]:
        return "the first group is not the trunk's parameters"
    if [id(p) for p in head_group["params"]] != [id(p) for p in model.value_head.parameters()]:
        return "the second group is not the value head's parameters"
    if base_group["lr"] != BASE_LR or head_group["lr"] != HEAD_LR:
        return f"LRs {base_group['lr']}, {head_group['lr']}, expected {BASE_LR}, {HEAD_LR}"
    if not all(group["maximize"] for group in optimizer.param_groups):
        return "not every group has maximize=True"
    # One step on an objective must increase it.
    inputs = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    def objective():
        return model.value_head(model.base_model(inputs)).mean()

    before = objective()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    if not objective().item() > before.item():
        return f"one step took the objective from {before.item()} to {objective().item()}"
    return None


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
    problem = optimizer_problem(get_optimizer)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong", [optimizer_minimising, optimizer_lrs_swapped, optimizer_one_group]
)
def test_optimizer_check_rejects_wrong_versions(wrong):
    assert optimizer_problem(wrong) is not None


def critic_free_problem(make: Callable) -> str | None:
    """None if a policy without a value head (`value_head` None, critic-free) gets one AdamW
    group, its trunk's parameters at base_lr, maximising; else what differs."""
    model = PolicyWithHead()
    model.value_head = None
    optimizer = make(model, BASE_LR, HEAD_LR)
    groups = [([id(p) for p in group["params"]], group["lr"], group["maximize"])
              for group in optimizer.param_groups]
    expected = [([id(p) for p in model.base_model.parameters()], BASE_LR, True)]
    return None if groups == expected else f"groups {groups}, expected {expected}"


def optimizer_with_an_empty_head_group(model, base_lr, head_lr):
    """A head group whatever the policy: its LR would be logged for a head that is not there."""
    return torch.optim.AdamW([{"params": model.base_model.parameters(), "lr": base_lr},
                              {"params": [], "lr": head_lr}], maximize=True)


def test_a_critic_free_policy_gets_one_group():
    problem = critic_free_problem(get_optimizer)
    assert problem is None, problem
    optimizer, _ = get_optimizer_and_scheduler(PolicyWithHead(), BASE_LR, HEAD_LR, 0, 2, 0.1)
    assert len(optimizer.param_groups) == 2  # with a head, two


@pytest.mark.parametrize("wrong", [optimizer_with_an_empty_head_group, optimizer_lrs_swapped])
def test_the_critic_free_check_rejects_wrong_versions(wrong):
    assert critic_free_problem(wrong) is not None
