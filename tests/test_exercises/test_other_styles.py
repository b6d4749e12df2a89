"""Right answers written in another style than minirlhf's (torch.distributions, F.* functions,
other but equivalent formulas) pass the checks: a check judges the result and its gradient, never
the way they were computed."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from minirlhf import exercises


def kl_by_f_kl_div(logits, ref_logits, kl_coef):
    pointwise = F.kl_div(ref_logits.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                         reduction="none")
    return kl_coef * pointwise.sum(-1).mean()


def kl_by_torch_distributions_in_float64(logits, ref_logits, kl_coef):
    kl = kl_divergence(Categorical(logits=logits.double()), Categorical(logits=ref_logits.double()))
    return kl_coef * kl.mean().float()


def entropy_by_torch_distributions(logits, ent_coef):
    return ent_coef * Categorical(logits=logits).entropy().mean()


def value_loss_by_f_mse_loss(values, mb_returns, vf_coef):
    return 0.5 * vf_coef * F.mse_loss(values, mb_returns)


def surrogate_by_where(logprobs, mb_logprobs, mb_advantages, clip_coef):
    ratio = torch.exp(logprobs - mb_logprobs)
    capped = torch.where(mb_advantages >= 0, ratio.clamp(max=1 + clip_coef),
                         ratio.clamp(min=1 - clip_coef))
    return (capped * mb_advantages).mean()


def whiten_by_var_mean(advantages, eps=1e-8):
    var, mean = torch.var_mean(advantages, correction=0)
    return (advantages - mean) / (var.sqrt() + eps)


def pairwise_by_bce_with_logits(chosen_rewards, rejected_rewards, margin=None):
    x = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)
    return F.binary_cross_entropy_with_logits(x, torch.ones_like(x))


def k3_by_ratio_and_its_log(logprobs, ref_logprobs):
    ratio = torch.exp(ref_logprobs - logprobs)
    return ratio - 1 - torch.log(ratio)


def dpo_by_logsigmoid(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, beta, loss_type="sigmoid"):
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    return -F.logsigmoid(beta * h).mean()


OTHER_STYLES = [
    ("calc_kl_penalty", kl_by_f_kl_div),
    ("calc_kl_penalty", kl_by_torch_distributions_in_float64),
    ("calc_entropy_bonus", entropy_by_torch_distributions),
    ("calc_value_function_loss", value_loss_by_f_mse_loss),
    ("calc_clipped_surrogate_objective", surrogate_by_where),
    ("whiten", whiten_by_var_mean),
    ("calc_pairwise_loss", pairwise_by_bce_with_logits),
    ("calc_kl_k3", k3_by_ratio_and_its_log),
    ("calc_dpo_loss", dpo_by_logsigmoid),
]


@pytest.mark.parametrize("name, impl", OTHER_STYLES, ids=[f.__name__ for _, f in OTHER_STYLES])
def test_a_right_answer_in_another_style_passes(name, impl):
    exercises.CHECKS[name](impl)
