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
  KL penalty at every token), returns-to-go, normalised over the whole batch. Its "baseline"
  variant does the same with each reward less its group's mean.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from jaxtyping import Float, Int
from torch import Tensor


def get_answer_ends(
    response_mask: Int[Tensor, "batch gen_len"] | None, gen_len: int, batch: int,
    device: torch.device | str = "cpu",
) -> Float[Tensor, "batch gen_len"]:
    """1.0 at each answer's last real token (its EOS, or the last generated token when it has
    none), 0 elsewhere. Without a mask every answer ends at the last position."""
    if response_mask is None:
        ends = torch.zeros(batch, gen_len, device=device)
        ends[:, -1] = 1.0
        return ends
    lengths = response_mask.sum(dim=-1).long()
    return F.one_hot(lengths - 1, gen_len).float()


def get_alive(
    response_mask: Int[Tensor, "batch gen_len"] | None, like: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """The response mask as floats (all ones without a mask): 1 for real tokens, 0 for padding."""
    return torch.ones_like(like) if response_mask is None else response_mask.to(like.dtype)


@torch.no_grad()
def compute_one_step_advantages(
    values: Float[Tensor, "batch seq"],
    rewards: Float[Tensor, " batch"],
    prefix_len: int,
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """One-step advantages A_t = V(s_{t+1}) - V(s_t), with the reward as the target of each
    answer's last real token (`response_mask`; None: every answer has gen_len tokens) and
    advantage 0 on the padding after it."""
    state_values = values[:, prefix_len - 1 : -1]
    alive = get_alive(response_mask, state_values)
    ends = get_answer_ends(response_mask, *state_values.shape[::-1], state_values.device)
    next_alive = torch.cat([alive[:, 1:], torch.zeros_like(alive[:, :1])], dim=1)
    next_values = torch.cat([state_values[:, 1:], torch.zeros_like(state_values[:, :1])], dim=1)
    targets = rewards[:, None] * ends + next_values * next_alive
    return (targets - state_values) * alive


@torch.no_grad()
def compute_gae(
    values: Float[Tensor, "batch seq"],
    rewards: Float[Tensor, " batch"],
    prefix_len: int,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """Generalised advantage estimates, computed backwards from the last generated token. Each
    answer ends at its own last real token (`response_mask`): the reward arrives there, no
    value follows it, and the padding after it gets advantage 0."""
    state_values = values[:, prefix_len - 1 : -1]
    gen_len = state_values.shape[1]
    alive = get_alive(response_mask, state_values)
    ends = get_answer_ends(response_mask, gen_len, len(state_values), state_values.device)
    # V of the state after each step; after an answer's last token the episode is over, so 0.
    next_alive = torch.cat([alive[:, 1:], torch.zeros_like(alive[:, :1])], dim=1)
    next_values = torch.cat([state_values[:, 1:], torch.zeros_like(state_values[:, :1])], dim=1)
    deltas = (rewards[:, None] * ends + gamma * next_values * next_alive - state_values) * alive
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
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """REINFORCE++ (Hu 2025): per-token reward r_t = -kl_coef * kl_t, plus the sequence reward at
    each answer's last real token; advantage = the return-to-go sum_{s >= t} gamma^(s-t) r_s,
    whitened over every real token of the batch (not per group, not per minibatch); padding 0."""
    alive = get_alive(response_mask, kl)
    ends = get_answer_ends(response_mask, kl.shape[1], len(kl), kl.device)
    step_rewards = (-kl_coef * kl + rewards[:, None] * ends) * alive
    returns = torch.zeros_like(step_rewards)
    running = torch.zeros_like(rewards)
    for t in reversed(range(step_rewards.shape[1])):
        running = step_rewards[:, t] + gamma * running
        returns[:, t] = running
    return whiten(returns, response_mask=response_mask, eps=eps) * alive


@torch.no_grad()
def compute_reinforce_pp_baseline_advantages(
    rewards: Float[Tensor, " batch"], kl: Float[Tensor, "batch gen_len"], kl_coef: float,
    group_size: int, gamma: float = 1.0,
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """REINFORCE++-baseline (Hu 2025, its variant for several samples a prompt): REINFORCE++ on
    each reward minus its prompt's group mean. The batch-wide whitening stays, so what a sample is
    credited with is how much better it did than the other answers to its own prompt, not how
    easy its prompt was. A group of one is refused by `compute_group_advantages`."""
    centred = compute_group_advantages(rewards, group_size, scale_by_std=False)
    return compute_reinforce_pp_advantages(centred, kl, kl_coef, gamma,
                                           response_mask=response_mask)


class Estimator(NamedTuple):
    """What the trainer needs to know of an advantage estimator."""

    needs_critic: bool
    """It reads a value head's values (the policy is built with one)."""
    whitened: bool
    """The learning loop whitens its advantages per minibatch (`whiten`); the critic-free ones
    come already scaled as their papers say (per group, or over the whole batch)."""


ESTIMATORS = {
    "one_step": Estimator(needs_critic=True, whitened=True),
    "gae": Estimator(needs_critic=True, whitened=True),
    "grpo": Estimator(needs_critic=False, whitened=False),
    "dr_grpo": Estimator(needs_critic=False, whitened=False),
    "rloo": Estimator(needs_critic=False, whitened=False),
    "reinforce_pp": Estimator(needs_critic=False, whitened=False),
    "reinforce_pp_baseline": Estimator(needs_critic=False, whitened=False),
}
"""Every advantage estimator, by the name `RLHFArgs.advantage_estimator` gives it."""


@torch.no_grad()
def compute_advantages(
    estimator: str,
    rewards: Float[Tensor, " batch"],
    values: Float[Tensor, "batch gen_len"] | None,
    kl: Float[Tensor, "batch gen_len"],
    kl_coef: float,
    group_size: int = 1,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """The advantage of every generated token by `estimator` (a key of `ESTIMATORS`): the one
    place an estimator is chosen. Padding after an answer's end (`response_mask` 0) gets 0.

    Args:
        values: V(s_t) in the state that chose each token (estimators with a critic only).
        kl: the KL of each token; the REINFORCE++ pair take `-kl_coef * kl` as a per-token
            reward (kl_coef 0 keeps the KL out of the reward). The others ignore it.
    """
    gen_len = kl.shape[1]
    if ESTIMATORS[estimator].needs_critic:
        # Indexed by position as after a one-token prompt: 0 .. gen_len - 1, NaN (never read).
        values = F.pad(values, (0, 1), value=float("nan"))
    match estimator:
        case "one_step":
            return compute_one_step_advantages(values, rewards, 1, response_mask)
        case "gae":
            return compute_gae(values, rewards, 1, gamma, gae_lambda, response_mask)
        case "grpo" | "dr_grpo":
            advantages = compute_group_advantages(rewards, group_size, estimator == "grpo")
        case "rloo":
            advantages = compute_rloo_advantages(rewards, group_size)
        case "reinforce_pp":
            return compute_reinforce_pp_advantages(rewards, kl, kl_coef, gamma,
                                                   response_mask=response_mask)
        case "reinforce_pp_baseline":
            return compute_reinforce_pp_baseline_advantages(rewards, kl, kl_coef, group_size,
                                                            gamma, response_mask)
    per_token = repeat(advantages, "batch -> batch gen_len", gen_len=gen_len)
    return per_token if response_mask is None else per_token * response_mask


def whiten(
    advantages: Float[Tensor, "minibatch gen_len"],
    moments: tuple[Float[Tensor, ""], Float[Tensor, ""]] | None = None,
    eps: float = 1e-8,
    response_mask: Int[Tensor, "minibatch gen_len"] | None = None,
) -> Float[Tensor, "minibatch gen_len"]:
    """Advantages shifted and scaled to mean 0 and (population) std 1 over the real tokens of the
    whole minibatch (`response_mask`; None: every token), as CleanRL does before PPO's loss: a
    minibatch of one token has no signal then, not NaN. `moments` (mean, std) replace the
    minibatch's own (data parallelism passes the global minibatch's, of which `advantages` is one
    process's share). Padding is whitened too, and never read."""
    mean, std = moments or get_moments(advantages, response_mask)
    return (advantages - mean) / (std + eps)


def get_moments(
    values: Float[Tensor, "batch gen_len"], response_mask: Int[Tensor, "batch gen_len"] | None
) -> tuple[Float[Tensor, ""], Float[Tensor, ""]]:
    """The mean and population std of the real tokens' values."""
    real = values if response_mask is None else values[response_mask.bool()]
    return real.mean(), real.std(correction=0)
