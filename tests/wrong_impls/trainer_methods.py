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
from minirlhf.models import gather_rollout, get_rollout_outputs
from minirlhf.trainer import Rollout

from . import wrong


def _kl_with_detached_weights(logits, ref_logits, kl_coef):
    logprobs, ref_logprobs = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    return kl_coef * (logprobs.exp().detach() * (logprobs - ref_logprobs)).sum(-1).mean()


def _objective(self, mb, *, value_sign=-1.0, kl=True, entropy_sign=1.0, tempered=True,
               detach=False, kl_penalty=calc_kl_penalty):
    """The objective written out; each keyword switches on one mistake."""
    args = self.args
    if tempered:
        logits, values = self.model.forward_generated(mb.sample_ids, mb.attention_mask,
                                                      mb.prefix_len, mb.kept)
    else:  # the raw logits of a forward pass, not divided by the temperature
        all_logits, all_values = self.model(mb.sample_ids, mb.attention_mask)
        logits = all_logits[:, mb.prefix_len - 1 : -1].float()
        values = all_values[:, mb.prefix_len - 1 : -1].float()
    logprobs = get_gen_logprobs(logits, mb.sample_ids[:, mb.prefix_len :])
    ref_logits = self.reference.get_logits(mb.kept)
    objective = (calc_clipped_surrogate_objective(logprobs, mb.logprobs, mb.advantages,
                                                  args.clip_coef)
                 + value_sign * calc_value_function_loss(values, mb.returns, args.vf_coef)
                 + entropy_sign * calc_entropy_bonus(logits, args.ent_coef))
    if kl:
        objective = objective - kl_penalty(logits, ref_logits, args.kl_coef)
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


@wrong("compute_rlhf_objective", "the kl_penalty's probability weights are detached")
def objective_with_a_detached_kl(self, mb):
    """A learner's own calc_kl_penalty with a silent gradient bug, called by their objective."""
    return _objective(self, mb, kl_penalty=_kl_with_detached_weights)


# ---------------------------------------------------------------- rollout phases


def _rollout(self, *, seeded=True, estimator=True, swap=False, kl=True, reward_metric="rewards"):
    """A rollout phase written out; each keyword switches on one mistake."""
    args, prompts = self.args, self.get_phase_prompts()
    generator = self.streams.sample if seeded else torch.Generator()  # not the trainer's stream
    samples = self.sample(prompts, generator, for_training=True)
    rewards, loss_mask = self.score(samples, prompts)
    outputs = get_rollout_outputs(self.model, self.reference, samples, args.kl_estimator,
                                  args.minibatch_size)
    if estimator:
        advantages = self.compute_advantages(gather_rollout(samples, rewards, outputs))
    else:  # the raw reward at the last token, no value baseline, no normalisation
        advantages = torch.zeros_like(outputs.values)
        advantages[:, -1] = rewards
    first, second = (outputs.values, advantages) if swap else (advantages, outputs.values)
    memory = ReplayMemory(samples.sample_ids, samples.attention_mask, outputs.logprobs,
                          first, second, outputs.kept, loss_mask)
    mean = rewards.mean() if reward_metric == "rewards" else advantages.mean()
    metrics = {"charts/reward_mean": mean.item()}
    if kl:
        metrics["charts/kl"] = outputs.exact_kl.mean().item()
    return Rollout(memory, samples.texts, rewards, outputs.exact_kl.mean().item() * args.gen_len,
                   metrics)


@wrong("rollout_phase", "self.streams.sample, the trainer's own random stream")
def unseeded_rollout(self):
    return _rollout(self, seeded=False)


@wrong("rollout_phase", "self.compute_advantages(gather_rollout(samples, rewards, outputs))")
def raw_rewards_as_advantages(self):
    return _rollout(self, estimator=False)


@wrong("rollout_phase", "ReplayMemory's order is")
def values_and_advantages_swapped(self):
    return _rollout(self, swap=True)


@wrong("rollout_phase", "charts/kl")
def no_kl_metric(self):
    return _rollout(self, kl=False)


@wrong("rollout_phase", "the reward plot would stay flat")
def reward_metric_from_the_advantages(self):
    """Passed before issue 27: notebook 4's reward plot went flat under a pass."""
    return _rollout(self, reward_metric="advantages")
