# %% [markdown]
# # 2. Rewards, normalisation and advantages
#
# A rollout gives us texts. The reward function scores each finished text with one number; PPO
# then needs to know, for every *token*, whether choosing it made things better or worse than
# expected. That per-token signal is the **advantage**. This notebook builds the path from texts
# to advantages:
#
# 1. a reward function (count a character),
# 2. reward normalisation (mean 0, standard deviation 1 within each batch),
# 3. one-step advantages, the estimator of the original design (see `docs/seeds.md`),
# 4. generalised advantage estimation (GAE), which learns much faster here.
#
# **What you will learn**
#
# - why rewards are normalised per batch, and why with the population standard deviation;
# - which position of a sequence holds the value of the state each generated token was chosen in;
# - how the one-step estimate and GAE assign a sequence's reward to its tokens.
#
# **Reading**
#
# - Schulman et al. 2016, *High-Dimensional Continuous Control Using Generalized Advantage
#   Estimation* (arXiv:1506.02438), sections 2 and 3.
# - Sutton and Barto, *Reinforcement Learning: An Introduction* (2nd ed.), chapter 12 on
#   λ-returns, for where $\lambda$ comes from.
# - OpenAI Spinning Up, *Part 3: Intro to Policy Optimization*, on advantage functions.
# - This repository's `docs/advantages.md`.
#
# **How the help works.** Each exercise is labelled with its difficulty and importance (out of 5)
# and the time to allow. Under its description are hints: open them one at a time, and only when
# stuck. The full solution follows the check, collapsed. When a check fails it shows your own
# traceback first, then what differed, the mistake you most likely made, and the inputs of the
# failing case; `exercises.last_failure().rerun(your_function)` runs that case again, so you can
# add prints and debug it by hand.

# %%
import matplotlib.pyplot as plt
import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf import exercises

torch.manual_seed(0)

# %% [markdown]
# ## Exercise 1: count a character
#
# The classic first RLHF task (from the ARENA exercises) needs no model at all: reward each sample
# by how many periods it contains. Return a float tensor, one reward per sample.
#
# Labels: difficulty 1, importance 2, 5 minutes
#
# Hint: `str.count` counts the occurrences of a substring; wrap the counts in
# `torch.tensor(..., dtype=torch.float32)`.


# %%
def reward_fn_char_count(samples: list[str], char: str = ".") -> Float[Tensor, " batch"]:
    """The number of times `char` appears in each sample, as a float tensor of shape (batch,)."""
    # BEGIN SOLUTION
    return torch.tensor([sample.count(char) for sample in samples], dtype=torch.float32)
    # END SOLUTION


# %%
exercises.check_reward_fn_char_count(reward_fn_char_count)

# %% [markdown]
# ## Exercise 2: normalise the rewards
#
# Rewards come on any scale: 0 to 10 periods, VADER's $[-1, 1]$, a classifier's probability. We
# shift and scale each phase's rewards to mean 0 and standard deviation 1, so the learning rates
# and coefficients mean the same thing whatever the reward:
#
# $$\hat r_i = \frac{r_i - \bar r}{\sigma_r + \epsilon}, \qquad
#   \sigma_r = \sqrt{\tfrac{1}{n}\textstyle\sum_i (r_i - \bar r)^2}$$
#
# Use the **population** standard deviation (divide by $n$, `correction=0`). PyTorch's default
# `.std()` divides by $n - 1$, which is NaN for a batch of one (the original design had that bug).
#
# Labels: difficulty 1, importance 3, 5 minutes
#
# Hint: `reward.std(correction=0)` is the population standard deviation.
#
# Predict: What should your function return for a batch of a single reward?
#
# Answer: Zero: the reward minus its own mean is 0, the standard deviation is 0, and
# $0 / (0 + \epsilon) = 0$. With `.std()` it would be $0/0$, NaN, and one NaN in a loss turns
# every weight into NaN at the next step.


# %%
def normalize_reward(
    reward: Float[Tensor, " batch"], eps: float = 1e-5
) -> Float[Tensor, " batch"]:
    """Rewards shifted and scaled to mean 0 and population std 1 (zeros if they are all equal)."""
    # BEGIN SOLUTION
    return (reward - reward.mean()) / (reward.std(correction=0) + eps)
    # END SOLUTION


# %%
exercises.check_normalize_reward(normalize_reward)

# %% [markdown]
# ## Which position is which
#
# A sequence is the prompt (`prefix_len` tokens, BOS included) followed by `gen_len` generated
# tokens. The logits at position $p$ predict the token at $p + 1$, and the value head's output at
# position $p$ is the value of the state "everything up to $p$". So generated token $t$ (at
# position `prefix_len + t`) was chosen in state $s_t$, whose value sits one position earlier:
#
# ```text
# position:   0     1     2   | 3     4     5     6       (prefix_len = 3, gen_len = 4)
# token:      BOS   This  is  | g0    g1    g2    g3
# values:     v0    v1    v2  | v3    v4    v5    v6
#                         ^     ^     ^     ^
#                        V(s0) V(s1) V(s2) V(s3)    = values[:, prefix_len - 1 : -1]
# ```
#
# The last value, `values[:, -1]`, is the value after the final token: the text is finished, so
# nothing uses it, and the reward stands in its place.
#
# ## Exercise 3: one-step advantages
#
# The original design estimates the advantage of token $t$ as how much the value went up after
# choosing it:
#
# $$A_t = V(s_{t+1}) - V(s_t) \quad (t < T - 1), \qquad A_{T-1} = r - V(s_{T-1})$$
#
# where $r$ is the (normalised) reward. Return one advantage per generated token:
# shape `(batch, gen_len)`. Mind the batch dimension when slicing (the original design sliced
# the rows by mistake).
#
# Labels: difficulty 2, importance 4, 15 minutes
#
# Hint: The baseline $V(s_t)$ of the `gen_len` generated tokens is `values[:, prefix_len - 1 :
# -1]`, from the diagram above.
#
# Hint: The targets are the next state's value for every token but the last,
# `values[:, prefix_len:-1]` (`gen_len - 1` columns), then the reward as one more column:
# `torch.cat([..., rewards[:, None]], dim=-1)`.


# %%
@torch.no_grad()
def compute_one_step_advantages(
    values: Float[Tensor, "batch seq"], rewards: Float[Tensor, " batch"], prefix_len: int
) -> Float[Tensor, "batch gen_len"]:
    """One-step advantages.

    Args:
        values: (batch, seq), the value head's output at every position.
        rewards: (batch,), one reward per sample.
        prefix_len: the number of prompt tokens (the first generated token's position).

    Returns:
        (batch, gen_len), where gen_len = seq - prefix_len.
    """
    # BEGIN SOLUTION
    one_step_estimate = torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)
    zero_step_estimate = values[:, prefix_len - 1 : -1]
    return one_step_estimate - zero_step_estimate
    # END SOLUTION


# %%
exercises.check_compute_one_step_advantages(compute_one_step_advantages)

# %% [markdown]
# ## Exercise 4: generalised advantage estimation
#
# The one-step estimate trusts the value head completely: with a freshly initialised head, the
# reward only reaches the last token. GAE (Schulman et al. 2016) mixes in longer horizons. With
# per-step rewards $r_t$ (here 0 except the sequence reward at the last step) and
# $V(s_T) = 0$ after the last token:
#
# $$\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t), \qquad
#   A_t = \sum_{l \ge 0} (\gamma\lambda)^l\, \delta_{t+l} = \delta_t + \gamma\lambda\, A_{t+1}$$
#
# Compute it with the recursion, looping backwards from the last generated token.
# $\lambda = 0$ gives back the one-step estimate (with $\gamma = 1$); $\lambda = 1$ gives the
# Monte-Carlo estimate $A_t = r - V(s_t)$, which sends the reward to every token at once.
#
# Labels: difficulty 3, importance 4, 20 minutes
#
# Hint: Compute every $\delta_t$ at once first: the next values are the state values shifted
# left by one with a 0 appended; the step rewards are zeros except the last column, which holds
# the reward.
#
# Hint: Then loop `for t in reversed(range(gen_len))` with a running sum per row:
# `running = deltas[:, t] + gamma * gae_lambda * running`, stored into column `t`.


# %%
@torch.no_grad()
def compute_gae(
    values: Float[Tensor, "batch seq"],
    rewards: Float[Tensor, " batch"],
    prefix_len: int,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
) -> Float[Tensor, "batch gen_len"]:
    """Generalised advantage estimates of shape (batch, gen_len)."""
    # BEGIN SOLUTION
    state_values = values[:, prefix_len - 1 : -1]
    gen_len = state_values.shape[1]
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
    # END SOLUTION


# %%
exercises.check_compute_gae(compute_gae)

# %% [markdown]
# ### How far back does the reward reach?
#
# Take one sequence whose value head predicts 0 everywhere and whose reward is 1. The one-step
# estimate gives all the credit to the last token; GAE spreads it backwards, decaying by
# $\gamma\lambda$ per step.
#
# Predict: With $\gamma = 1$, $\lambda = 0.5$ and this value head, what advantage does the first
# of the 12 generated tokens get?
#
# Answer: $0.5^{11} \approx 0.0005$: each step back multiplies by $\gamma\lambda = 0.5$. With
# $\lambda = 1$ every token gets the whole reward, 1.

# %%
prefix_len, gen_len = 3, 12
values = torch.zeros(1, prefix_len + gen_len)
reward = torch.tensor([1.0])
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(compute_one_step_advantages(values, reward, prefix_len)[0], "k--", label="one-step")
for gae_lambda in [0.5, 0.9, 1.0]:
    gae = compute_gae(values, reward, prefix_len, gamma=1.0, gae_lambda=gae_lambda)
    ax.plot(gae[0], label=f"GAE λ={gae_lambda}")
ax.set_xlabel("generated token t")
ax.set_ylabel("advantage $A_t$")
ax.legend()
plt.show()

# %% [markdown]
# This is why notebook 4 trains with `advantage_estimator="gae"` and `gae_lambda=1.0`: the reward
# reaches every token from the first phase on, instead of waiting for the value head to learn.
