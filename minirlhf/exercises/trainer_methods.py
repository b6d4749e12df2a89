"""Checks for assembling the objective inside the trainer (notebook 4).

`compute_rlhf_objective(self, mb)` is where every earlier piece meets: the policy's logits and
values from `self.model.evaluate`, the log-probs of the generated tokens, the reference's logits
from `self.reference`, the four terms and their signs. The check runs the learner's method and
`RLHFTrainer.compute_rlhf_objective` on the same minibatch of a trainer whose policy has already
moved from the one that sampled (so the ratio is not 1 and the KL not 0), and compares the
objective and its gradient. A wrong objective is explained by which term it is off by.
"""

from collections.abc import Callable

import torch

from minirlhf.exercises.core import passed, single_threaded
from minirlhf.exercises.optim_and_learning import char_trainer
from minirlhf.exercises.reporting import crash_hint, describe_error, fail, learner_facing
from minirlhf.memory import ReplayMinibatch
from minirlhf.trainer import RLHFTrainer, Rollout

ObjectiveFn = Callable[[RLHFTrainer, ReplayMinibatch], tuple[torch.Tensor, dict[str, float]]]
TERMS = {"losses/clipped_surrogate": +1, "losses/value_loss": -1, "losses/entropy_bonus": +1,
         "losses/kl_penalty": -1}
"""Each term of the objective and the sign it enters with."""


def _moved_trainer() -> tuple[RLHFTrainer, ReplayMinibatch]:
    """A tiny trainer at temperature 1.5 after one learning phase, and a minibatch of a fresh
    rollout whose policy then takes one more step: every term is non-zero."""
    trainer = char_trainer(batches_per_learning_phase=1, warmup_steps=0, base_lr=3e-2,
                           head_lr=3e-2, ent_coef=0.05, temperature=1.5)
    trainer.train_one_phase()
    memory = trainer.rollout_phase().memory
    first, second = memory.get_minibatches(2, 1, torch.Generator().manual_seed(0))
    trainer.optimizer.zero_grad()
    RLHFTrainer.compute_rlhf_objective(trainer, first)[0].backward()
    trainer.optimizer.step()
    return trainer, second


def _gradient(trainer: RLHFTrainer, objective: torch.Tensor) -> list[torch.Tensor]:
    trainer.optimizer.zero_grad()
    objective.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for p in trainer.model.parameters()]
    trainer.optimizer.zero_grad()
    return grads


def _term_hint(gap: float, stats: dict[str, float]) -> str | None:
    """The term the learner's objective is off by, with the mistake that gives that gap."""
    for key, sign in TERMS.items():
        name, term = key.split("/")[1], stats[key]
        if abs(term) < 1e-6:
            continue
        if abs(gap - (-2 * sign * term)) < 1e-4 * max(1.0, abs(term)):
            return (f"the objective is off by exactly twice the {name}: did you "
                    f"{'add' if sign < 0 else 'subtract'} it? The objective is clipped_surrogate "
                    "- value_loss + entropy_bonus - kl_penalty.")
        if abs(gap - (-sign * term)) < 1e-4 * max(1.0, abs(term)):
            return f"the objective is off by exactly the {name}: did you leave it out?"
    return None


@learner_facing
@single_threaded
def check_compute_rlhf_objective(fn: ObjectiveFn) -> None:
    """Check `fn(self, mb)` (an `RLHFTrainer.compute_rlhf_objective`): the objective's value and
    its gradient against the reference method's, on a policy that has moved."""
    exercise = "compute_rlhf_objective"
    trainer, mb = _moved_trainer()
    case = "a tiny trainer at temperature 1.5, one phase in (ratio != 1, KL > 0)"
    expected, stats = RLHFTrainer.compute_rlhf_objective(trainer, mb)
    try:
        result = fn(trainer, mb)
    except Exception as error:  # the learner's crash, shown with their own line
        fail(exercise, case, describe_error(error), crash_hint(error), error=error)
    if not isinstance(result, tuple) or len(result) != 2:
        fail(exercise, case, "Return (objective, stats): the objective tensor and a dict of "
             f"floats; got {type(result).__name__}.")
    objective = result[0]
    if not isinstance(objective, torch.Tensor) or objective.shape != ():
        fail(exercise, case, f"The objective should be a scalar tensor; got {objective!r}.")
    gap = objective.item() - expected.item()
    if abs(gap) > 1e-5 * max(1.0, abs(expected.item())):
        hint = _term_hint(gap, stats) or ("use self.model.evaluate (it divides the logits by "
                                          "the temperature) and get_gen_logprobs on the "
                                          "generated tokens, mb.sample_ids[:, mb.prefix_len:].")
        fail(exercise, case, f"The objective is {objective.item():.6f}; expected "
             f"{expected.item():.6f}.", hint)
    if not objective.requires_grad:
        fail(exercise, case, "The objective carries no gradient.",
             "keep it a tensor: no .item(), .detach() or torch.no_grad() on the way.")
    wrong = [i for i, (a, b) in enumerate(zip(_gradient(trainer, expected),
                                              _gradient(trainer, objective)))
             if not torch.allclose(a, b, atol=1e-6)]
    if wrong:
        fail(exercise, case, f"The objective's value is right but its gradient differs in "
             f"{len(wrong)} parameter tensors.", "compute every term from tensors that carry "
             "gradients back to the model (the reference's logits need none).")
    passed(exercise, "value and gradient match the trainer's on a moved policy at temperature 1.5")


# ---------------------------------------------------------------- the rollout phase

RolloutFn = Callable[[RLHFTrainer], Rollout]
MEMORY_FIELDS = ["sample_ids", "attention_mask", "logprobs", "advantages", "values",
                 "ref_outputs"]
MEMORY_HINTS = {
    "sample_ids": "sample with seed=self.sample_generator (the trainer's own stream) and "
                  "self.sampling, from self.model.base_model.",
    "logprobs": "take the log-probs from self.evaluate_samples(samples).",
    "advantages": "self.compute_advantages(evaluation, rewards, samples.prefix_len) normalises "
                  "the rewards and runs the estimator of args.advantage_estimator.",
    "values": "ReplayMemory's order is (sample_ids, attention_mask, logprobs, advantages, "
              "values, ref_outputs).",
}


def _rollout_mismatch(expected: Rollout, got: object) -> tuple[str, str | None] | None:
    """(what differs, the hint) between two rollouts, or None."""
    if not isinstance(got, Rollout):
        return (f"Return a Rollout(memory, samples, rewards, metrics); got "
                f"{type(got).__name__}.", None)
    swapped = (got.memory.advantages.shape == expected.memory.values.shape
               and torch.allclose(got.memory.advantages, expected.memory.values)
               and torch.allclose(got.memory.values, expected.memory.advantages))
    if swapped:
        return "The memory's advantages and values are swapped.", MEMORY_HINTS["values"]
    for name in MEMORY_FIELDS:
        a, b = getattr(expected.memory, name), getattr(got.memory, name)
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=1e-5):
            return (f"The memory's {name} differs from the reference rollout's.",
                    MEMORY_HINTS.get(name, MEMORY_HINTS["values"]))
    if got.texts != expected.texts or not torch.equal(got.rewards, expected.rewards):
        return "The samples or rewards differ.", "return samples.texts and the rewards."
    missing = [key for key in ("charts/reward_mean", "charts/kl") if key not in got.metrics]
    if missing:
        return f"The metrics lack {missing}.", ("the plots read charts/reward_mean "
                                                "(rewards.mean()) and charts/kl "
                                                "(evaluation.kl.mean()).")
    return None


@learner_facing
@single_threaded
def check_rollout_phase(fn: RolloutFn) -> None:
    """Check `fn(self)` (an `RLHFTrainer.rollout_phase`) against the trainer's own, from the
    same random state: the same memory, samples, rewards, and the metrics the plots read."""
    exercise = "rollout_phase"
    trainer = char_trainer(batches_per_learning_phase=1, temperature=1.5)
    case = "a tiny trainer at temperature 1.5, batch 8, gen_len 4"
    state = trainer.get_rng_state()
    expected = RLHFTrainer.rollout_phase(trainer)
    trainer.set_rng_state(state)
    try:
        got = fn(trainer)
    except Exception as error:  # the learner's crash, shown with their own line
        fail(exercise, case, describe_error(error), crash_hint(error), error=error)
    mismatch = _rollout_mismatch(expected, got)
    if mismatch is not None:
        fail(exercise, case, *mismatch)
    passed(exercise, "the same memory, samples and rewards as the trainer's rollout, from the "
           "same random state")
