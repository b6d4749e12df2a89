"""The optimiser and learning-rate schedule.

Stage 7 of the pipeline. AdamW with two parameter groups: the pretrained transformer learns
slowly (`base_lr`), the freshly initialised value head faster (`head_lr`). `maximize=True`,
because the trainer maximises the RLHF objective. The schedule is stepped once per phase:
linear warmup to the full LR, then linear decay to `final_scale` at the last phase.
"""

import torch
from torch import nn


def get_optimizer(model: nn.Module, base_lr: float, head_lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable weights of `model.base_model` (at base_lr: all of them, the top
    blocks of a frozen trunk, or LoRA adapters) and `model.value_head` (at head_lr); a policy
    without a value head (critic-free) gets one group. Frozen weights are not handed to the
    optimiser, so it keeps no state for them."""
    trainable = [p for p in model.base_model.parameters() if p.requires_grad]
    groups = [{"params": trainable, "lr": base_lr}]
    if model.value_head is not None:
        groups.append({"params": model.value_head.parameters(), "lr": head_lr})
    return torch.optim.AdamW(
        groups,
        maximize=True,
        # One fused kernel over all parameters instead of a loop of small ops: on SmolLM2 on the
        # CPU an optimiser step takes about a third of the time (benchmarks/phase_time.py).
        fused=next(model.parameters()).device.type in ("cpu", "cuda"),
    )


def get_lr_scale(phase: int, warmup_steps: int, total_phases: int, final_scale: float) -> float:
    """The LR multiplier for a phase (0-based).

    Warmup: phase p < warmup_steps gets (p + 1) / warmup_steps, so the first phase already
    learns (p / warmup_steps would give LR 0 there) and the last warmup phase reaches 1.
    Decay: from 1 at phase `warmup_steps` linearly to `final_scale` at phase `total_phases - 1`.
    """
    if phase < warmup_steps:
        return (phase + 1) / warmup_steps
    decay_phases = max(1, total_phases - 1 - warmup_steps)
    progress = min(1.0, (phase - warmup_steps) / decay_phases)
    return 1.0 - (1.0 - final_scale) * progress


def get_optimizer_and_scheduler(
    model: nn.Module,
    base_lr: float,
    head_lr: float,
    warmup_steps: int,
    total_phases: int,
    final_scale: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and a LambdaLR applying `get_lr_scale` (call `scheduler.step()` per phase)."""
    optimizer = get_optimizer(model, base_lr, head_lr)

    def lr_lambda(phase: int) -> float:
        return get_lr_scale(phase, warmup_steps, total_phases, final_scale)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)
    return optimizer, scheduler
