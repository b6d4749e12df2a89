"""Checks for the trainer's methods of notebook 4: the objective and the rollout phase.

`compute_rlhf_objective(self, mb)` is where every earlier piece meets: the policy's logits and
values from `self.model.forward_generated`, the log-probs of the generated tokens, the
reference's logits from `self.reference`, the four terms and their signs. The check runs the
learner's method and `RLHFTrainer.compute_rlhf_objective` on the same minibatch of a trainer
whose policy has already moved from the one that sampled (so the ratio is not 1 and the KL not
0), and compares the objective and its gradient. A wrong objective is explained by which term it
is off by; a right value with a wrong gradient, by the KL penalty whose probability weights are
detached, if that is what reproduces it.

`rollout_phase(self)` is checked against the trainer's own from the same random state: the
memory, the samples, the rewards and the values of the metrics the plots read.
"""

import functools
from collections.abc import Callable

import torch

from minirlhf.advantages import whiten
from minirlhf.exercises.core import passed, single_threaded
from minirlhf.exercises.learning_phase import char_trainer
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
    # As the learning loop hands it over: whitened, so a learner's surrogate that whitens again
    # (notebook 3's does) changes nothing.
    second.advantages = whiten(second.advantages)
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


def _with_detached_kl_weights(trainer: RLHFTrainer, mb: ReplayMinibatch) -> torch.Tensor:
    """The trainer's objective with the KL penalty's probability weights detached: the same
    value, a gradient that misses most of the KL's (a mistake notebook 3's check names)."""
    objective, _ = RLHFTrainer.compute_rlhf_objective(trainer, mb)
    logits, _ = trainer.model.forward_generated(mb.sample_ids, mb.attention_mask, mb.prefix_len,
                                                mb.kept)
    logprobs = logits.log_softmax(-1)
    ref_logprobs = trainer.reference.get_logits(mb.kept).log_softmax(-1)
    log_ratio = logprobs - ref_logprobs
    exact = (logprobs.exp() * log_ratio).sum(-1).mean()
    detached = (logprobs.exp().detach() * log_ratio).sum(-1).mean()
    return objective + trainer.args.kl_coef * (exact - detached)  # swaps one KL for the other


def _gradient_hint(trainer: RLHFTrainer, mb: ReplayMinibatch, got: list[torch.Tensor]) -> str:
    detached = _gradient(trainer, _with_detached_kl_weights(trainer, mb))
    if all(torch.allclose(a, b, atol=1e-6) for a, b in zip(detached, got, strict=True)):
        return ("the kl_penalty's probability weights are detached: its value is right, but "
                "training then behaves as with no KL penalty at all. Compute p from the logits "
                "without .detach() (notebook 3's check of calc_kl_penalty names this too).")
    return ("compute every term from tensors that carry gradients back to the model (the "
            "reference's logits need none); run notebook 3's checks on the loss functions you "
            "call: one of them has a right value and a wrong gradient.")


@learner_facing
@single_threaded
def check_compute_rlhf_objective(fn: ObjectiveFn) -> None:
    """Check `fn(self, mb)` (an `RLHFTrainer.compute_rlhf_objective`): the objective's value and
    its gradient against the reference method's, on a policy that has moved."""
    exercise = "compute_rlhf_objective"
    trainer, mb = _moved_trainer()
    case = "a tiny trainer at temperature 1.5, one phase in (ratio != 1, KL > 0)"
    report = functools.partial(fail, exercise, case, inputs={"self": trainer, "mb": mb})
    expected, stats = RLHFTrainer.compute_rlhf_objective(trainer, mb)
    try:
        result = fn(trainer, mb)
    except Exception as error:  # the learner's crash, shown with their own line
        report(describe_error(error), crash_hint(error), error=error)
    if not isinstance(result, tuple) or len(result) != 2:
        report("Return (objective, stats): the objective tensor and a dict of floats; got "
               f"{type(result).__name__}.")
    objective = result[0]
    if not isinstance(objective, torch.Tensor) or objective.shape != ():
        report(f"The objective should be a scalar tensor; got {objective!r}.")
    gap = objective.item() - expected.item()
    if abs(gap) > 1e-5 * max(1.0, abs(expected.item())):
        hint = _term_hint(gap, stats) or (
            "use self.model.forward_generated (it divides the logits by the temperature) and "
            "get_gen_logprobs on the generated tokens, mb.sample_ids[:, mb.prefix_len:].")
        report(f"The objective is {objective.item():.6f}; expected {expected.item():.6f}.", hint)
    if not objective.requires_grad:
        report("The objective carries no gradient.",
               "keep it a tensor: no .item(), .detach() or torch.no_grad() on the way.")
    got = _gradient(trainer, objective)
    wrong = [i for i, (a, b) in enumerate(zip(_gradient(trainer, expected), got, strict=True))
             if not torch.allclose(a, b, atol=1e-6)]
    if wrong:
        report(f"The objective's value is right but its gradient differs in {len(wrong)} "
               "parameter tensors.", _gradient_hint(trainer, mb, got))
    passed(exercise, "value and gradient match the trainer's on a moved policy at temperature 1.5")


# ---------------------------------------------------------------- the rollout phase

RolloutFn = Callable[[RLHFTrainer], Rollout]
MEMORY_FIELDS = ["sample_ids", "attention_mask", "logprobs", "advantages", "values"]
MEMORY_HINTS = {
    "sample_ids": "sample with self.sample(prompts, self.streams.sample, for_training=True): "
                  "self.streams.sample, the trainer's own random stream.",
    "logprobs": "take the log-probs from get_rollout_outputs(...).logprobs.",
    "advantages": "self.compute_advantages(gather_rollout(samples, rewards, outputs)) "
                  "normalises the rewards and runs the estimator of args.advantage_estimator.",
    "values": "ReplayMemory's order is (sample_ids, attention_mask, logprobs, advantages, "
              "values, kept).",
    "kept": "store outputs.kept, what the models keep for the learning steps (the reference's "
            "logits among them).",
}
METRICS = {"charts/reward_mean": "rewards.mean(), the raw rewards' mean",
           "charts/kl": "outputs.exact_kl.mean(), the exact KL per token"}
"""The metrics the notebooks' plots read, and what each is (answers of gen_len tokens)."""


def _memory_mismatch(expected: Rollout, got: Rollout) -> tuple[str, str | None] | None:
    """(what differs, the hint) between two rollouts' memories, or None."""
    a, b = expected.memory, got.memory
    swapped = (b.advantages.shape == a.values.shape and torch.allclose(b.advantages, a.values)
               and torch.allclose(b.values, a.advantages))
    if swapped:
        return "The memory's advantages and values are swapped.", MEMORY_HINTS["values"]
    pairs = [(name, getattr(a, name), getattr(b, name)) for name in MEMORY_FIELDS]
    pairs += [(f"kept[{k!r}]", v, getattr(b, "kept", {}).get(k)) for k, v in a.kept.items()]
    for name, want, have in pairs:
        if have is None or want.shape != have.shape or not torch.allclose(
                want.float(), have.float(), atol=1e-5):
            return (f"The memory's {name} differs from the reference rollout's.",
                    MEMORY_HINTS.get(name.split("[")[0], MEMORY_HINTS["values"]))
    return None


def _metric_mismatch(expected: Rollout, got: Rollout) -> tuple[str, str | None] | None:
    """(what differs, the hint) between the metrics the plots read, or None."""
    for key, what in METRICS.items():
        if key not in got.metrics:
            return f"The metrics lack {key!r}.", f"the plots read {key}: {what}."
        want, have = expected.metrics[key], got.metrics[key]
        if abs(have - want) > 1e-5 * max(1.0, abs(want)):
            hint = f"{key} is {what}."
            if key == "charts/reward_mean" and abs(have - got.memory.advantages.mean()) < 1e-5:
                hint = ("charts/reward_mean is the mean of the advantages, which are normalised "
                        "(mean about 0), so the reward plot would stay flat however the policy "
                        "learns: take the mean of the rewards the reward function returned.")
            return f"The metric {key} is {have:.6g}; expected {want:.6g}.", hint
    if abs(got.kl - expected.kl) > 1e-5 * max(1.0, abs(expected.kl)):
        return (f"Rollout.kl is {got.kl:.6g}; expected {expected.kl:.6g}.",
                "Rollout.kl feeds the adaptive KL controller: the mean KL per answer, the exact "
                "KL per token times gen_len.")
    return None


def _rollout_mismatch(expected: Rollout, got: object) -> tuple[str, str | None] | None:
    """(what differs, the hint) between two rollouts, or None."""
    if not isinstance(got, Rollout):
        return (f"Return a Rollout(memory, texts, rewards, kl, metrics); got "
                f"{type(got).__name__}.", None)
    mismatch = _memory_mismatch(expected, got)
    if mismatch is not None:
        return mismatch
    if got.texts != expected.texts or not torch.equal(got.rewards, expected.rewards):
        return "The samples or rewards differ.", "return samples.texts and the rewards."
    return _metric_mismatch(expected, got)


@learner_facing
@single_threaded
def check_rollout_phase(fn: RolloutFn) -> None:
    """Check `fn(self)` (an `RLHFTrainer.rollout_phase`) against the trainer's own, from the
    same random state: the same memory, samples, rewards, and the values of the metrics the
    plots read (the reward's mean, the KL)."""
    exercise = "rollout_phase"
    trainer = char_trainer(batches_per_learning_phase=1, temperature=1.5)
    trainer.train_one_phase()  # the policy has moved: the KL is not 0
    case = "a tiny trainer at temperature 1.5, batch 8, gen_len 4, one phase in"
    state = trainer.streams.state_dict()
    expected = RLHFTrainer.rollout_phase(trainer)
    trainer.streams.load_state_dict(state)
    report = functools.partial(fail, exercise, case, inputs={"self": trainer})
    try:
        got = fn(trainer)
    except Exception as error:  # the learner's crash, shown with their own line
        report(describe_error(error), crash_hint(error), error=error)
    finally:
        trainer.streams.load_state_dict(state)  # a re-run starts where the check did
    mismatch = _rollout_mismatch(expected, got)
    if mismatch is not None:
        report(*mismatch)
    passed(exercise, "the same memory, samples, rewards and metrics (reward mean, KL) as the "
           "trainer's rollout, from the same random state")
