"""Checks for notebook 4's learning phase: PPO steps on the minibatches of one rollout.

The learning phase is run by the reference (`RLHFTrainer.learning_phase`) and by the learner's
function from the same state (weights, optimiser, scheduler and random streams restored in
between) on a tiny model, and the weights they reach are compared; along the way a hook on the
optimiser records each step's gradient norm and learning rate. The schedule warms up over two
phases, so phase 0's learning rate differs from phase 1's and a scheduler stepped too early shows.
"""

import contextlib
import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from minirlhf.advantages import whiten
from minirlhf.args import RLHFArgs
from minirlhf.exercises.core import Mistake, load_char_model, passed, single_threaded
from minirlhf.exercises.reporting import call, crash_hint, describe_error, fail, learner_facing
from minirlhf.memory import ReplayMemory
from minirlhf.rewards import reward_fn_char_count
from minirlhf.trainer import RLHFTrainer

# ---------------------------------------------------------------- one learning phase

LearningPhaseFn = Callable[[RLHFTrainer, ReplayMemory], dict[str, float]]


def char_trainer(**overrides) -> RLHFTrainer:
    """A quiet trainer on a tiny char model (batch 8, gen_len 4, prompt "a"), with `overrides`."""
    args = RLHFArgs(**{**dict(total_phases=3, batch_size=8, num_minibatches=2, gen_len=4,
                              prefix="a", prepend_bos=False, warmup_steps=0, kl_coef=0.5,
                              seed=0), **overrides})
    model = load_char_model(n_layers=1, d_model=16, n_heads=2, seed=4)
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model to"
        return RLHFTrainer(args, reward_fn_char_count, base_model=model,
                           console=Console(quiet=True), table_every=0)


def _make_trainer() -> tuple[RLHFTrainer, ReplayMemory]:
    """A trainer on a tiny char model and one rollout's memory (about a tenth of a second). Its
    warmup of 2 phases gives phase 0 half the LR of phase 1: a scheduler stepped before the
    minibatch loop shows."""
    trainer = char_trainer(batches_per_learning_phase=2, warmup_steps=2, base_lr=1e-2,
                           head_lr=1e-2, max_grad_norm=0.05, ent_coef=0.01)
    return trainer, trainer.rollout_phase().memory


def _snapshot(trainer: RLHFTrainer) -> dict:
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": (trainer.optimizer, trainer.optimizer.state_dict()),
        "scheduler": (trainer.scheduler, trainer.scheduler.state_dict()),
        "streams": trainer.streams.state_dict(),
    }


def _restore(trainer: RLHFTrainer, snapshot: dict) -> None:
    trainer.model.load_state_dict(snapshot["model"])
    trainer.model.zero_grad(set_to_none=True)  # as after a rollout: no gradients yet
    trainer.optimizer, optimizer_state = snapshot["optimizer"]
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.scheduler, scheduler_state = snapshot["scheduler"]
    trainer.scheduler.load_state_dict(scheduler_state)
    trainer.streams.load_state_dict(snapshot["streams"])


@dataclass
class PhaseRun:
    """What one learning phase did, seen from outside."""

    result: Any
    error: BaseException | None
    weights: dict[str, Tensor]
    grad_norms: list[float]
    """The global gradient norm each optimiser step was taken with."""
    lrs: list[float]
    """The first group's learning rate at each optimiser step."""
    scheduler_steps: int
    used_generator: bool
    """Whether the trainer's shuffle generator was drawn from."""


def _run(fn: LearningPhaseFn, trainer: RLHFTrainer, memory: ReplayMemory, snapshot: dict
         ) -> PhaseRun:
    """Run one learning phase from the snapshot, watching the optimiser's steps."""
    _restore(trainer, snapshot)
    grad_norms: list[float] = []
    lrs: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]
        grad_norms.append(torch.stack(grads).norm().item() if grads else 0.0)
        lrs.append(optimizer.param_groups[0]["lr"])

    handle = trainer.optimizer.register_step_pre_hook(record)
    epoch = trainer.scheduler.last_epoch
    shuffle = trainer.streams.shuffle.get_state()
    try:
        result, error = call(fn, {"self": trainer, "memory": memory}, positional=True)
    finally:
        handle.remove()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    used_generator = not torch.equal(trainer.streams.shuffle.get_state(), shuffle)
    return PhaseRun(result, error, weights, grad_norms, lrs,
                    trainer.scheduler.last_epoch - epoch, used_generator)


def _differing_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    """Names of the tensors that differ."""
    return [k for k in a if not torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-3)]


def _variant(sign: float = 1.0, zero_grad: bool = True, whiten_advantages: bool = True
             ) -> LearningPhaseFn:
    """The reference learning phase with one thing changed (to recognise the learner's)."""

    def learning_phase(self: RLHFTrainer, memory: ReplayMemory) -> dict[str, float]:
        args = self.args
        for mb in memory.get_minibatches(args.num_minibatches, args.batches_per_learning_phase,
                                         self.streams.shuffle):
            if whiten_advantages:
                mb.advantages = whiten(mb.advantages)
            if zero_grad:
                self.optimizer.zero_grad()
            objective, _ = self.compute_rlhf_objective(mb)
            (sign * objective).backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
        self.scheduler.step()
        return {}

    return learning_phase


LEARNING_MISTAKES = [
    Mistake("you minimised the objective instead of maximising it: the optimiser already has "
            "maximize=True, so call objective.backward(), not (-objective).backward().",
            _variant(sign=-1.0)),
    Mistake("did you forget optimizer.zero_grad()? Gradients then pile up across minibatches.",
            _variant(zero_grad=False)),
    Mistake("did you whiten the advantages? With a value head's estimator "
            "(ESTIMATORS[args.advantage_estimator].whitened), set mb.advantages = "
            "whiten(mb.advantages) before the objective.", _variant(whiten_advantages=False)),
]


def _learning_hint(run, trainer: RLHFTrainer, memory: ReplayMemory, snapshot: dict) -> str | None:
    """The named mistake whose weights the learner's run reproduces, if any."""
    if not run.used_generator:
        return ("did you pass self.streams.shuffle to memory.get_minibatches? Without it "
                "the minibatches are not the seeded ones.")
    for mistake in LEARNING_MISTAKES:
        if not _differing_weights(_run(mistake.imitate, trainer, memory, snapshot).weights,
                                  run.weights):
            return mistake.hint
    return None


def _check_steps(run: PhaseRun, reference: PhaseRun, args: RLHFArgs, report: Callable) -> None:
    """What the optimiser saw at each step: how many, their gradients, their learning rate."""
    steps = len(reference.grad_norms)
    if len(run.grad_norms) != steps:
        report(f"It took {len(run.grad_norms)} optimiser steps; expected {steps}: one per "
               "minibatch, num_minibatches * batches_per_learning_phase.")
    if not any(run.grad_norms):
        report("Every optimiser step was taken with all gradients zero, so the weights did not "
               "move.", "optimizer.zero_grad() runs between backward() and step(), wiping the "
               "gradients: zero them first, at the top of the loop, before backward().")
    too_big = [n for n in run.grad_norms if n > args.max_grad_norm * 1.001]
    if too_big:
        report(f"A step was taken with gradient norm {too_big[0]:.3g} > max_grad_norm = "
               f"{args.max_grad_norm}.", "did you forget torch.nn.utils.clip_grad_norm_("
               "self.model.parameters(), args.max_grad_norm) between backward() and "
               "optimizer.step()?")
    if run.scheduler_steps != 1:
        hint = ("did you forget self.scheduler.step()?" if run.scheduler_steps == 0 else
                "step the scheduler once per phase, after the minibatch loop, not per minibatch.")
        report(f"The scheduler was stepped {run.scheduler_steps} times; expected once.", hint)
    wrong_lr = [lr for lr, want in zip(run.lrs, reference.lrs, strict=True)
                if abs(lr - want) > 1e-12]
    if wrong_lr:
        report(f"A step was taken at learning rate {wrong_lr[0]:.3g}; this phase's is "
               f"{reference.lrs[0]:.3g}.", "you stepped the scheduler before the minibatch "
               "loop, so the phase ran at the next phase's learning rate: step it once, after "
               "the loop.")


@learner_facing
@single_threaded
def check_learning_phase(fn: LearningPhaseFn) -> None:
    """Check `fn(self, memory)` (an `RLHFTrainer.learning_phase`): one PPO step per minibatch,
    gradients clipped, each step at this phase's learning rate, the scheduler stepped once after
    them, and the same weights as the reference."""
    exercise = "learning_phase"
    trainer, memory = _make_trainer()
    args = trainer.args
    case = (f"a tiny model, batch_size={args.batch_size}, num_minibatches={args.num_minibatches}, "
            f"batches_per_learning_phase={args.batches_per_learning_phase}, warmup_steps=2")
    report = functools.partial(fail, exercise, case, inputs={"self": trainer, "memory": memory})
    snapshot = _snapshot(trainer)
    reference = _run(RLHFTrainer.learning_phase, trainer, memory, snapshot)
    # Every reference step clips (its norm is max_grad_norm): a learner who doesn't clip shows.
    assert min(reference.grad_norms) > 0.99 * args.max_grad_norm
    assert trainer.scheduler.get_last_lr()[0] != reference.lrs[0], "phases 0, 1: same LR"
    run = _run(fn, trainer, memory, snapshot)
    _restore(trainer, snapshot)
    if run.error is not None:
        report(describe_error(run.error), crash_hint(run.error), error=run.error)
    _check_steps(run, reference, args, report)
    if not isinstance(run.result, dict):
        report(f"Return a dict of metrics; got {type(run.result).__name__}.")
    differ = _differing_weights(reference.weights, run.weights)
    if differ:
        hint = _learning_hint(run, trainer, memory, snapshot)
        _restore(trainer, snapshot)
        report(f"After the phase the weights differ from the reference's (first in "
               f"{differ[0]!r}, {len(differ)} of {len(run.weights)} tensors).", hint)
    passed(exercise, f"{len(reference.grad_norms)} clipped steps at this phase's learning rate, "
           "one scheduler step, and the same weights as the reference's learning phase")
