"""Wrong optimisers, schedules and learning phases (notebook 4)."""

import torch

from minirlhf.advantages import whiten

from . import wrong

# ---------------------------------------------------------------- optimisers


@wrong("get_optimizer", "use AdamW")
def plain_adam(model, base_lr, head_lr):
    return torch.optim.Adam([{"params": model.base_model.parameters(), "lr": base_lr},
                             {"params": model.value_head.parameters(), "lr": head_lr}],
                            maximize=True)


@wrong("get_optimizer", "give the transformer and the value head a group each")
def one_group(model, base_lr, head_lr):
    return torch.optim.AdamW(model.parameters(), lr=base_lr, maximize=True)


@wrong("get_optimizer", "pass maximize=True")
def minimising_optimizer(model, base_lr, head_lr):
    return torch.optim.AdamW([{"params": model.base_model.parameters(), "lr": base_lr},
                              {"params": model.value_head.parameters(), "lr": head_lr}])


@wrong("get_optimizer", "The groups are in the wrong order")
def groups_reversed(model, base_lr, head_lr):
    return torch.optim.AdamW([{"params": model.value_head.parameters(), "lr": head_lr},
                              {"params": model.base_model.parameters(), "lr": base_lr}],
                             maximize=True)


@wrong("get_optimizer", "model.parameters() includes the value head")
def value_head_twice(model, base_lr, head_lr):
    return torch.optim.AdamW([{"params": model.parameters(), "lr": base_lr},
                              {"params": model.value_head.parameters(), "lr": head_lr}],
                             maximize=True)


@wrong("get_optimizer", "base_lr and head_lr are swapped")
def learning_rates_swapped(model, base_lr, head_lr):
    return torch.optim.AdamW([{"params": model.base_model.parameters(), "lr": head_lr},
                              {"params": model.value_head.parameters(), "lr": base_lr}],
                             maximize=True)


# ---------------------------------------------------------------- LR schedules


@wrong("get_lr_scale", "warmup_steps=0 means no warmup")
def divides_by_warmup(phase, warmup_steps, total_phases, final_scale):
    warmup = (phase + 1) / warmup_steps
    if phase < warmup_steps:
        return warmup
    progress = (phase - warmup_steps) / max(1, total_phases - 1 - warmup_steps)
    return 1 - (1 - final_scale) * progress


def _optimizer(model, base_lr, head_lr):
    return torch.optim.AdamW([{"params": model.base_model.parameters(), "lr": base_lr},
                              {"params": model.value_head.parameters(), "lr": head_lr}],
                             maximize=True)


@wrong("get_optimizer_and_scheduler", "check the spelling")
def misspelt_scheduler_module(model, base_lr, head_lr, warmup_steps, total_phases, final_scale):
    """`lr_scheulder`: a typo in the module name (the original design had it)."""
    optimizer = _optimizer(model, base_lr, head_lr)
    scheduler = torch.optim.lr_scheulder.LambdaLR(optimizer, lr_lambda=lambda step: 1.0)
    return optimizer, scheduler


@wrong("get_optimizer_and_scheduler", "check the spelling")
def misspelt_lambda_keyword(model, base_lr, head_lr, warmup_steps, total_phases, final_scale):
    """`lr_lamda`: a typo in the keyword (the original design had this one too)."""
    optimizer = _optimizer(model, base_lr, head_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lamda=lambda step: 1.0)
    return optimizer, scheduler


@wrong("get_optimizer_and_scheduler", "LR 0 in the first phase")
def scheduler_from_zero(model, base_lr, head_lr, warmup_steps, total_phases, final_scale):
    optimizer = _optimizer(model, base_lr, head_lr)

    def lr_lambda(phase):
        if phase < warmup_steps:
            return phase / warmup_steps
        progress = (phase - warmup_steps) / max(1, total_phases - 1 - warmup_steps)
        return 1 - (1 - final_scale) * progress

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)


# ---------------------------------------------------------------- learning phases


def _learning_phase(self, memory, *, sign=1.0, zero_grad="first", generator=True,
                    clip="before", scheduler="once", step_every_minibatch=True, result=True,
                    whitened=True):
    """A learning phase written out; each keyword switches on one mistake."""
    args = self.args
    shuffle = self.streams.shuffle if generator else None
    minibatches = memory.get_minibatches(args.num_minibatches, args.batches_per_learning_phase,
                                         shuffle)
    if scheduler == "before the loop":
        self.scheduler.step()
    if not step_every_minibatch:
        self.optimizer.zero_grad()
    for mb in minibatches:
        if whitened:
            mb.advantages = whiten(mb.advantages)
        if zero_grad == "first" and step_every_minibatch:
            self.optimizer.zero_grad()
        objective, _ = self.compute_rlhf_objective(mb)
        (sign * objective).backward()
        if zero_grad == "after backward":
            self.optimizer.zero_grad()
        if clip == "before":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        if step_every_minibatch:
            self.optimizer.step()
        if clip == "after":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        if scheduler == "every minibatch":
            self.scheduler.step()
    if not step_every_minibatch:
        self.optimizer.step()
    if scheduler == "once":
        self.scheduler.step()
    return {"losses/objective": objective.item()} if result else None


@wrong("learning_phase", "did you whiten the advantages?")
def advantages_not_whitened(self, memory):
    return _learning_phase(self, memory, whitened=False)


@wrong("learning_phase", "did you pass self.streams.shuffle")
def unseeded_minibatches(self, memory):
    return _learning_phase(self, memory, generator=False)


@wrong("learning_phase", "did you forget torch.nn.utils.clip_grad_norm_")
def no_clipping(self, memory):
    return _learning_phase(self, memory, clip=None)


@wrong("learning_phase", "did you forget torch.nn.utils.clip_grad_norm_")
def clips_after_the_step(self, memory):
    return _learning_phase(self, memory, clip="after")


@wrong("learning_phase", "did you forget self.scheduler.step()")
def no_scheduler_step(self, memory):
    return _learning_phase(self, memory, scheduler=None)


@wrong("learning_phase", "step the scheduler once per phase")
def scheduler_every_minibatch(self, memory):
    return _learning_phase(self, memory, scheduler="every minibatch")


@wrong("learning_phase", "you stepped the scheduler before the minibatch loop")
def scheduler_before_the_loop(self, memory):
    """Passed before issue 27: the check's LR was the same in phases 0 and 1."""
    return _learning_phase(self, memory, scheduler="before the loop")


@wrong("learning_phase", "zero_grad() runs between backward() and step()")
def zero_grad_after_backward(self, memory):
    """Once told only "weights differ", though every step's gradient norm was 0."""
    return _learning_phase(self, memory, zero_grad="after backward")


@wrong("learning_phase", "one per minibatch")
def one_step_per_phase(self, memory):
    return _learning_phase(self, memory, step_every_minibatch=False)


@wrong("learning_phase", "Return a dict of metrics")
def returns_nothing(self, memory):
    return _learning_phase(self, memory, result=False)
