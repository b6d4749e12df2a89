"""Wrong group advantages and KL estimators (notebook 7) that a check recognises by what it
observes, not by replaying a catalogued mistake."""

from . import wrong


@wrong("compute_group_advantages", "changed its input 'rewards' in place")
def group_advantages_in_place(rewards, group_size, scale_by_std=True, eps=1e-6):
    groups = rewards.view(-1, group_size)  # a view: editing it edits the caller's rewards
    groups -= groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        groups /= groups.std(dim=1, keepdim=True) + eps
    return groups.flatten()


@wrong("compute_rloo_advantages", "Expected floats")
def rloo_as_integers(rewards, group_size):
    groups = rewards.view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten().long()


@wrong("calc_kl_k3", "no gradient")
def k3_detached(logprobs, ref_logprobs):
    log_ratio = (ref_logprobs - logprobs).detach()
    return log_ratio.exp() - 1 - log_ratio


@wrong("calc_kl_k2", "no gradient")
def k2_rebuilt_as_a_new_tensor(logprobs, ref_logprobs):
    import torch

    return torch.tensor((0.5 * (ref_logprobs - logprobs).pow(2)).tolist())


@wrong("calc_kl_k1", "Expected shape (1, 2) = (batch, gen_len), got (2,)")
def k1_flattened(logprobs, ref_logprobs):
    return (logprobs - ref_logprobs).flatten()


@wrong("calc_kl_k3", "the ratio r is detached")
def k3_with_detached_ratio(logprobs, ref_logprobs):
    """Right value; at kl_coef 1, GRPO ends at KL 6.1 instead of 0.08."""
    log_r = ref_logprobs - logprobs
    return log_r.exp().detach() - 1 - log_r


@wrong("calc_kl_k3", "log r is detached in the `- log r` term")
def k3_with_detached_log_ratio(logprobs, ref_logprobs):
    log_r = ref_logprobs - logprobs
    return log_r.exp() - 1 - log_r.detach()
