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
"""

import torch
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
