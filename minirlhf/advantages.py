"""Advantages: how much better each generated token did than the value model expected.

Stage 4 of the pipeline. Positions: with a prompt of `prefix_len` tokens, generated token t
(t = 0 .. gen_len-1) sits at position `prefix_len + t`. It was chosen in state s_t, the sequence
up to position `prefix_len + t - 1`, so V(s_t) = values[:, prefix_len - 1 + t]:

    V(s_0 .. s_{T-1})   = values[:, prefix_len - 1 : -1]     (one per generated token)
    V(s_1 .. s_{T-1})   = values[:, prefix_len : -1]         (the next states, but the last)

The only reward is the sequence's, at the last step (the KL penalty is a separate loss term in
this design, as in the ARENA exercises, not a per-token reward).

- One-step (the ARENA exercises' estimator): A_t = V(s_{t+1}) - V(s_t), and r - V(s_{T-1}) at
  the last step.
- GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"):
  delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = delta_t + gamma lambda A_{t+1}.
  lambda = 0 gives the one-step estimate (with gamma = 1), lambda = 1 the Monte-Carlo r - V(s_t).

Critic-free estimators (no value head; docs/critic_free.md). The samples of one prompt sit next
to each other: group g is rows g * group_size .. (g + 1) * group_size - 1.

- GRPO (Shao et al. 2024, DeepSeekMath): (r - mean of its group) / std of its group.
  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no std division.
- RLOO (Ahmadian et al. 2024, "Back to Basics"): r minus the mean of the *other* samples of its
  prompt, so a sample's own reward never enters its baseline.
- REINFORCE++ (Hu 2025): a per-token reward (the sequence reward at the last token, minus the
  KL penalty at every token), returns-to-go, normalised over the whole batch.
"""

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor


@torch.no_grad()
def compute_advantages(
    values: Float[Tensor, "batch seq"],
    rewards: Float[Tensor, " batch"],
    prefix_len: int,
) -> Float[Tensor, "batch gen_len"]:
    """One-step advantages A_t = V(s_{t+1}) - V(s_t), with the reward as the last step's target."""
    one_step_estimate = torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)
    zero_step_estimate = values[:, prefix_len - 1 : -1]
    return one_step_estimate - zero_step_estimate


@torch.no_grad()
def compute_gae(
    values: Float[Tensor, "batch seq"],
    rewards: Float[Tensor, " batch"],
    prefix_len: int,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
) -> Float[Tensor, "batch gen_len"]:
    """Generalised advantage estimates, computed backwards from the last generated token."""
    state_values = values[:, prefix_len - 1 : -1]
    gen_len = state_values.shape[1]
    # V of the state after each step; after the last token the episode is over, so 0.
    next_values = torch.cat([state_values[:, 1:], torch.zeros_like(state_values[:, :1])], dim=1)
    step_rewards = torch.zeros_like(state_values)
    step_rewards[:, -1] = rewards
    deltas = step_rewards + gamma * next_values - state_values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(gen_len)):
        running = deltas[:, t] + gamma * gae_lambda * running
        advantages[:, t] = running
    return advantages


def get_groups(
    rewards: Float[Tensor, " batch"], group_size: int
) -> Float[Tensor, "group group_size"]:
    """The rewards as one row per prompt (adjacent samples share a prompt)."""
    assert rewards.shape[0] % group_size == 0, (
        f"{rewards.shape[0]} rewards cannot be split into groups of {group_size}")
    return rearrange(rewards, "(group size) -> group size", size=group_size)


def get_zero_std_fraction(rewards: Float[Tensor, " batch"], group_size: int) -> float:
    """The share of prompts whose samples all got the same reward. GRPO, Dr. GRPO and RLOO give
    them advantage 0: they teach nothing this phase (TRL logs it as frac_reward_zero_std)."""
    groups = get_groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1).float().mean().item()


@torch.no_grad()
def compute_group_advantages(
    rewards: Float[Tensor, " batch"], group_size: int, scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Float[Tensor, " batch"]:
    """GRPO's advantage of each sample: its reward minus its group's mean, divided by its group's
    (sample, n - 1) std when `scale_by_std` (Shao et al. 2024); without it, Dr. GRPO's (Liu et al.
    2025). A group whose rewards are all equal gets advantage 0 (`eps` keeps it finite)."""
    assert group_size >= 2, "a group of one sample has no baseline but itself: group_size >= 2"
    groups = get_groups(rewards, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return rearrange(advantages, "group size -> (group size)")


@torch.no_grad()
def compute_rloo_advantages(
    rewards: Float[Tensor, " batch"], group_size: int
) -> Float[Tensor, " batch"]:
    """RLOO (Ahmadian et al. 2024): r_i - mean of the other group_size - 1 rewards of its prompt.
    Not normalised. Equal to group_size / (group_size - 1) times (r_i - group mean)."""
    assert group_size >= 2, "leave-one-out needs another sample of the prompt: group_size >= 2"
    groups = get_groups(rewards, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return rearrange(groups - others_mean, "group size -> (group size)")


@torch.no_grad()
def compute_reinforce_pp_advantages(
    rewards: Float[Tensor, " batch"], kl: Float[Tensor, "batch gen_len"], kl_coef: float,
    gamma: float = 1.0, eps: float = 1e-8,
) -> Float[Tensor, "batch gen_len"]:
    """REINFORCE++ (Hu 2025): per-token reward r_t = -kl_coef * kl_t, plus the sequence reward at
    the last token; advantage = the return-to-go sum_{s >= t} gamma^(s-t) r_s, normalised to mean
    0 and (population) std 1 over every token of the batch (not per group, not per minibatch)."""
    step_rewards = -kl_coef * kl
    step_rewards[:, -1] += rewards
    returns = torch.zeros_like(step_rewards)
    running = torch.zeros_like(rewards)
    for t in reversed(range(step_rewards.shape[1])):
        running = step_rewards[:, t] + gamma * running
        returns[:, t] = running
    return (returns - returns.mean()) / (returns.std(correction=0) + eps)


def compute_critic_free_advantages(
    estimator: str, rewards: Float[Tensor, " batch"], kl: Float[Tensor, "batch gen_len"],
    group_size: int, kl_coef: float, gamma: float = 1.0,
) -> Float[Tensor, "batch gen_len"]:
    """The advantages of a critic-free `estimator` ("grpo", "dr_grpo", "rloo", "reinforce_pp")
    for every generated token. `kl` (per token) enters only REINFORCE++'s reward; pass zeros to
    keep the KL out of it. GRPO and RLOO give all tokens of a sample its sequence advantage."""
    if estimator == "reinforce_pp":
        return compute_reinforce_pp_advantages(rewards, kl, kl_coef, gamma)
    if estimator == "rloo":
        advantages = compute_rloo_advantages(rewards, group_size)
    else:
        advantages = compute_group_advantages(rewards, group_size, estimator == "grpo")
    return repeat(advantages, "batch -> batch gen_len", gen_len=kl.shape[1])
