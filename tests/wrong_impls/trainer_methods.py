"""Wrong `compute_rlhf_objective` and `rollout_phase` methods (notebook 4)."""

import torch

from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    get_gen_logprobs,
)
from minirlhf.memory import ReplayMemory
from minirlhf.rewards import get_rewards
from minirlhf.sampling import get_samples
from minirlhf.trainer import Rollout

from . import wrong


def _objective(self, mb, *, value_sign=-1.0, kl=True, entropy_sign=1.0, tempered=True,
               detach=False):
    """The objective written out; each keyword switches on one mistake."""
    args = self.args
    if tempered:
        logits, values = self.model.evaluate(mb.sample_ids, mb.attention_mask, mb.prefix_len)
    else:  # the raw logits of a forward pass, not divided by the temperature
        all_logits, all_values = self.model(mb.sample_ids, mb.attention_mask)
        logits = all_logits[:, mb.prefix_len - 1 : -1].float()
        values = all_values[:, mb.prefix_len - 1 : -1].float()
    logprobs = get_gen_logprobs(logits, mb.sample_ids[:, mb.prefix_len :])
    ref_logits = self.reference.get_logits(mb.ref_outputs)
    objective = (calc_clipped_surrogate_objective(logprobs, mb.logprobs, mb.advantages,
                                                  args.clip_coef)
                 + value_sign * calc_value_function_loss(values, mb.returns, args.vf_coef)
                 + entropy_sign * calc_entropy_bonus(logits, args.ent_coef))
    if kl:
        objective = objective - calc_kl_penalty(logits, ref_logits, args.kl_coef)
    return (objective.detach() if detach else objective), {}


@wrong("compute_rlhf_objective", "twice the value_loss: did you add it?")
def value_loss_added(self, mb):
    return _objective(self, mb, value_sign=+1.0)


@wrong("compute_rlhf_objective", "off by exactly the kl_penalty: did you leave it out?")
def kl_penalty_left_out(self, mb):
    return _objective(self, mb, kl=False)


@wrong("compute_rlhf_objective", "twice the entropy_bonus: did you subtract it?")
def entropy_subtracted(self, mb):
    return _objective(self, mb, entropy_sign=-1.0)


@wrong("compute_rlhf_objective", "divides the logits by the temperature")
def untempered_logits(self, mb):
    return _objective(self, mb, tempered=False)


@wrong("compute_rlhf_objective", "carries no gradient")
def detached_objective(self, mb):
    return _objective(self, mb, detach=True)


# ---------------------------------------------------------------- rollout phases


def _rollout(self, *, seeded=True, estimator=True, swap=False, kl=True):
    """A rollout phase written out; each keyword switches on one mistake."""
    args = self.args
    samples = get_samples(self.model.base_model, self.prompts, args.batch_size, args.gen_len,
                          self.sampling, args.prepend_bos,
                          seed=self.sample_generator if seeded else None,
                          return_final_residual=True)
    rewards = get_rewards(self.reward_fn, samples.texts)
    evaluation = self.evaluate_samples(samples)
    if estimator:
        advantages = self.compute_advantages(evaluation, rewards, samples.prefix_len)
    else:  # the raw reward at the last token, no value baseline, no normalisation
        advantages = torch.zeros_like(evaluation.values)
        advantages[:, -1] = rewards
    first, second = (evaluation.values, advantages) if swap else (advantages, evaluation.values)
    memory = ReplayMemory(samples.sample_ids, samples.attention_mask, evaluation.logprobs,
                          first, second, evaluation.ref_outputs)
    metrics = {"charts/reward_mean": rewards.mean().item()}
    if kl:
        metrics["charts/kl"] = evaluation.kl.mean().item()
    return Rollout(memory, samples.texts, rewards, metrics)


@wrong("rollout_phase", "seed=self.sample_generator")
def unseeded_rollout(self):
    return _rollout(self, seeded=False)


@wrong("rollout_phase", "self.compute_advantages(evaluation, rewards, samples.prefix_len)")
def raw_rewards_as_advantages(self):
    return _rollout(self, estimator=False)


@wrong("rollout_phase", "ReplayMemory's order is")
def values_and_advantages_swapped(self):
    return _rollout(self, swap=True)


@wrong("rollout_phase", "charts/kl")
def no_kl_metric(self):
    return _rollout(self, kl=False)
