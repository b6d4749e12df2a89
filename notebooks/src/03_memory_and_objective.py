# %% [markdown]
# # 3. The replay memory and the four terms of the objective
#
# After a rollout we have, for every sample: its tokens, the log-probabilities the policy gave
# them, their advantages, the value head's estimates, and the reference model's logits. The
# **replay memory** stores them and serves them back as shuffled minibatches; on each minibatch
# the learning phase computes the RLHF objective, which the optimiser **maximises**:
#
# $$J = \underbrace{L^\text{CLIP}}_\text{clipped surrogate}
#     - \underbrace{c_\text{vf}\, L^\text{VF}}_\text{value loss}
#     + \underbrace{c_\text{ent}\, H}_\text{entropy bonus}
#     - \underbrace{c_\text{kl}\, \mathrm{KL}(\pi_\theta \,\|\, \pi_\text{ref})}_\text{KL penalty}$$
#
# Every term below is written as a positive quantity; the sign in front of it is applied by the
# trainer. Each function takes the logits at the **generated positions only**
# (`logits[:, prefix_len - 1 : -1]`, one row per generated token). The last exercise puts the
# four terms together with their signs.
#
# **What you will learn**
#
# - how PPO reuses one rollout for several shuffled passes without mixing up samples;
# - how to pick the log-probability of each generated token, and why off-by-one matters;
# - the four terms of the objective, what each one is for, and the sign each one takes.
#
# **Reading**
#
# - Schulman et al. 2017, *Proximal Policy Optimization Algorithms* (arXiv:1707.06347),
#   sections 3 and 5.
# - Huang et al. 2022, *The 37 Implementation Details of Proximal Policy Optimization* (ICLR
#   blog track): advantage normalisation, the value loss, the entropy bonus.
# - CleanRL's `ppo.py`, whose loss lines these functions mirror.
# - This repository's `docs/objective.md`.
#
# As before: labels (difficulty and importance out of 5, minutes to allow), hints to open one at a
# time, the solution collapsed after each check; `exercises.last_failure()` holds a failing case.

# %%
import matplotlib.pyplot as plt
import torch
from jaxtyping import Float, Int
from torch import Tensor

from minirlhf import exercises
from minirlhf.memory import ReplayMinibatch

torch.manual_seed(0)

# %% [markdown]
# ## Exercise 1: minibatches from the replay memory
#
# PPO reuses each rollout for several passes (`batches_per_learning_phase`, PPO's "epochs"). Each
# pass draws a fresh random permutation of the samples (with the given `generator`, so a seeded
# generator reproduces it) and cuts it into `num_minibatches` equal minibatches. Every tensor of
# a minibatch must be indexed with the same indices, so each row stays one sample. The value
# head's targets, the **returns**, are advantages + values.
#
# Labels: difficulty 2, importance 3, 15 minutes
#
# Hint: `torch.randperm(batch_size, generator=generator)` is one pass's order, and
# `.reshape(num_minibatches, -1)` cuts it into rows of indices, one row per minibatch.
#
# Hint: Compute `returns = self.advantages + self.values` once, then build each
# `ReplayMinibatch` by indexing every tensor (returns and each tensor in `kept` included) with the
# same `indices`.


# %%
class ReplayMemory:
    """One rollout phase's data (all tensors indexed by sample along dim 0)."""

    def __init__(self, sample_ids, attention_mask, logprobs, advantages, values, kept):
        self.sample_ids = sample_ids  # (batch, seq)
        self.attention_mask = attention_mask  # (batch, seq)
        self.logprobs = logprobs  # (batch, gen_len)
        self.advantages = advantages  # (batch, gen_len)
        self.values = values  # (batch, gen_len): V(s_t) of each generated token
        # What the models keep for the learning steps, one row per sample: here the reference's
        # logits, kept["reference"] (batch, gen_len, d_vocab). The memory does not look inside.
        self.kept = kept

    def get_minibatches(
        self,
        num_minibatches: int,
        batches_per_learning_phase: int,
        generator: torch.Generator | None = None,
    ) -> list[ReplayMinibatch]:
        """`batches_per_learning_phase` shuffled passes, each split into `num_minibatches`."""
        # BEGIN SOLUTION
        batch_size = self.logprobs.shape[0]
        returns = self.advantages + self.values
        minibatches = []
        for _ in range(batches_per_learning_phase):
            order = torch.randperm(batch_size, generator=generator)
            for indices in order.reshape(num_minibatches, -1):
                minibatches.append(
                    ReplayMinibatch(
                        sample_ids=self.sample_ids[indices],
                        attention_mask=self.attention_mask[indices],
                        logprobs=self.logprobs[indices],
                        advantages=self.advantages[indices],
                        returns=returns[indices],
                        kept={name: value[indices] for name, value in self.kept.items()},
                    )
                )
        return minibatches
        # END SOLUTION


# %%
exercises.check_replay_memory(ReplayMemory)

# %% [markdown]
# ## Exercise 2: log-probabilities of the generated tokens
#
# The PPO ratio compares how likely each generated token is under the current policy and under
# the policy that sampled it. The logits at position $s$ predict the token at $s + 1$, so the
# log-prob of token $s$ comes from `log_softmax(logits[:, s - 1])`. Return them for the generated
# tokens only (positions `prefix_len` onwards), or for every next token when `prefix_len` is None.
# `gather` (or `eindex`) picks one entry per position.
#
# Labels: difficulty 2, importance 5, 15 minutes
#
# Hint: `logits[:, start - 1 : -1]` are the logits that predicted `tokens[:, start:]`, where
# `start` is `prefix_len`, or 1 when it is None.
#
# Hint: Take `log_softmax(dim=-1)` first, then `.gather(-1, tokens[:, start:, None])` picks one
# log-prob per position; `.squeeze(-1)` drops the trailing axis.


# %%
def get_logprobs(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    prefix_len: int | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """Log-probs of tokens[:, prefix_len:] (shape (batch, seq - prefix_len))."""
    # BEGIN SOLUTION
    start = 1 if prefix_len is None else prefix_len
    logprobs = logits[:, start - 1 : -1].log_softmax(dim=-1)
    return logprobs.gather(-1, tokens[:, start:, None]).squeeze(-1)
    # END SOLUTION


# %%
exercises.check_get_logprobs(get_logprobs)

# %% [markdown]
# ## Exercise 3: the KL penalty (subtracted)
#
# The reward model is imperfect, and a policy that chases it alone drifts into text no one would
# write (notebook 4 shows this). The KL penalty keeps it near the reference model. We compute it
# exactly, summing over the whole vocabulary at each generated position, then average:
#
# $$\mathrm{KL}(\pi_\theta \,\|\, \pi_\text{ref}) = \sum_v \pi_\theta(v)
#   \big(\log \pi_\theta(v) - \log \pi_\text{ref}(v)\big)$$
#
# Use `log_softmax` (not `log(softmax(...))`, which gives $\log 0 = -\infty$ for large logits)
# and remember the coefficient.
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: Per position, `(logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)`, both log-probs
# from `log_softmax`. Then `.mean()` over positions and samples, times `kl_coef`.
#
# Predict: What is the penalty when the policy equals the reference? Can it ever be negative?
#
# Answer: 0 when they are equal (every log-ratio is 0), and never negative: a KL divergence is
# at least 0 (Gibbs' inequality). A negative value means the sign or the direction is wrong.


# %%
def calc_kl_penalty(
    logits: Float[Tensor, "minibatch gen_len d_vocab"],
    ref_logits: Float[Tensor, "minibatch gen_len d_vocab"],
    kl_coef: float,
) -> Float[Tensor, ""]:
    """kl_coef times the mean KL(policy || reference) over positions. A positive scalar."""
    # BEGIN SOLUTION
    logprobs = logits.log_softmax(dim=-1)
    ref_logprobs = ref_logits.log_softmax(dim=-1)
    kl_per_position = (logprobs.exp() * (logprobs - ref_logprobs)).sum(dim=-1)
    return kl_coef * kl_per_position.mean()
    # END SOLUTION


# %%
exercises.check_calc_kl_penalty(calc_kl_penalty)

# %% [markdown]
# ## Exercise 4: the entropy bonus (added)
#
# A small bonus for keeping the policy's distribution spread out, so it keeps exploring:
# $H(\pi) = -\sum_v \pi(v) \log \pi(v)$, averaged over positions, times `ent_coef`.
#
# Labels: difficulty 1, importance 2, 5 minutes
#
# Hint: Sum $-p \log p$ over the vocabulary (`dim=-1`), with $p$ from `softmax` and $\log p$
# from `log_softmax`; then the mean over positions and samples, times `ent_coef`.


# %%
def calc_entropy_bonus(
    logits: Float[Tensor, "minibatch gen_len d_vocab"], ent_coef: float
) -> Float[Tensor, ""]:
    """ent_coef times the mean entropy of the policy at the generated positions."""
    # BEGIN SOLUTION
    logprobs = logits.log_softmax(dim=-1)
    return ent_coef * -(logprobs.exp() * logprobs).sum(dim=-1).mean()
    # END SOLUTION


# %%
exercises.check_calc_entropy_bonus(calc_entropy_bonus)

# %% [markdown]
# ## Exercise 5: the value-function loss (subtracted)
#
# The value head regresses onto the returns: $L^\text{VF} = \tfrac12\,
# \mathbb{E}\big[(V(s_t) - R_t)^2\big]$, times `vf_coef`. (The $\tfrac12$ is CleanRL's and
# the ARENA exercises'; it makes the gradient $V - R$.)
#
# Labels: difficulty 1, importance 3, 5 minutes
#
# Hint: Half the mean of the squared differences, times the coefficient; the mean runs over every
# token of every sample.


# %%
def calc_value_function_loss(
    values: Float[Tensor, "minibatch gen_len"],
    mb_returns: Float[Tensor, "minibatch gen_len"],
    vf_coef: float,
) -> Float[Tensor, ""]:
    """vf_coef times half the mean squared error of the values against the returns."""
    # BEGIN SOLUTION
    return 0.5 * vf_coef * (values - mb_returns).pow(2).mean()
    # END SOLUTION


# %%
exercises.check_calc_value_function_loss(calc_value_function_loss)

# %% [markdown]
# ## Exercise 6: whitened advantages
#
# PPO with a value head feeds its loss advantages *whitened* over the minibatch: shifted and
# scaled to mean 0 and (population) standard deviation 1, every token of every sample together.
# Their scale then does not depend on the reward's, and about half the tokens are pushed up and
# half down. minirlhf does it in the learning loop, right before the loss, as CleanRL does
# (`ESTIMATORS[...].whitened` says which estimators want it: the critic-free ones come already
# scaled as their papers say).
#
# Labels: difficulty 1, importance 3, 5 minutes
#
# Hint: `(advantages - advantages.mean()) / (advantages.std(correction=0) + eps)`: the population
# std, so a minibatch of one token gives 0, not NaN.


# %%
def whiten(advantages: Float[Tensor, "minibatch gen_len"], eps: float = 1e-8
           ) -> Float[Tensor, "minibatch gen_len"]:
    """Advantages with mean 0 and population std 1 over the whole minibatch."""
    # BEGIN SOLUTION
    return (advantages - advantages.mean()) / (advantages.std(correction=0) + eps)
    # END SOLUTION


# %%
exercises.check_whiten(whiten)

# %% [markdown]
# ## Exercise 7: the clipped surrogate objective (added)
#
# PPO's core. With the probability ratio $\rho_t = \exp(\log\pi_\theta(a_t) -
# \log\pi_\text{old}(a_t))$ and the (whitened) advantages $A_t$:
#
# $$L^\text{CLIP} = \mathbb{E}_t\Big[\min\big(\rho_t A_t,\;
#   \mathrm{clip}(\rho_t, 1 - \epsilon, 1 + \epsilon)\, A_t\big)\Big]$$
#
# The minimum is the pessimistic bound: once a good token's probability has risen by more than
# $\epsilon$ (`clip_coef`), there is nothing more to gain from raising it in this phase.
#
# Labels: difficulty 3, importance 5, 20 minutes
#
# Hint: The ratio is `(logprobs - mb_logprobs).exp()`. Use the advantages as they come: they are
# whitened already.
#
# Hint: `ratio.clamp(1 - clip_coef, 1 + clip_coef)` is the clipped ratio; take `torch.minimum`
# of the two products, token by token, then the mean.


# %%
def calc_clipped_surrogate_objective(
    logprobs: Float[Tensor, "minibatch gen_len"],
    mb_logprobs: Float[Tensor, "minibatch gen_len"],
    mb_advantages: Float[Tensor, "minibatch gen_len"],
    clip_coef: float,
) -> Float[Tensor, ""]:
    """PPO's clipped surrogate objective, averaged over the minibatch's tokens."""
    # BEGIN SOLUTION
    ratio = (logprobs - mb_logprobs).exp()
    unclipped = ratio * mb_advantages
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * mb_advantages
    return torch.minimum(unclipped, clipped).mean()
    # END SOLUTION


# %%
exercises.check_calc_clipped_surrogate_objective(calc_clipped_surrogate_objective)

# %% [markdown]
# ### What clipping does
#
# For a single token, the surrogate as a function of the ratio: with a positive advantage it stops
# rising at $1 + \epsilon$; with a negative one it stops falling at $1 - \epsilon$. Beyond those
# points the gradient is zero, which is what keeps each update small.
#
# Predict: A token with a negative advantage already has ratio 0.7, below $1 - \epsilon = 0.8$.
# Does this phase push its probability down further?
#
# Answer: No: the minimum picks the clipped term, $0.8\,A$, a constant, so its gradient is zero.
# The token has already lost as much probability as one phase allows.

# %%
ratios = torch.linspace(0.5, 1.5, 201)
fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
for ax, advantage in zip(axes, [1.0, -1.0], strict=True):
    clipped = torch.minimum(ratios * advantage, ratios.clamp(0.8, 1.2) * advantage)
    ax.plot(ratios, ratios * advantage, "k:", label="ratio × A")
    ax.plot(ratios, clipped, label="clipped surrogate")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_title(f"A = {advantage:+.0f}, clip_coef = 0.2")
    ax.set_xlabel("ratio π_θ / π_old")
axes[0].legend()
plt.show()

# %% [markdown]
# ## Exercise 8: the objective, with its signs
#
# The trainer adds the four terms into the one number it maximises. Write that sum: each term's
# heading above says whether it is added or subtracted. (Inside `RLHFTrainer` this is the last
# line of `compute_rlhf_objective`, after the four functions you wrote.)
#
# Labels: difficulty 1, importance 5, 5 minutes
#
# Hint: The surrogate and the entropy bonus are rewards; the value loss and the KL penalty are
# costs. The optimiser has `maximize=True`, so nothing is negated at the end.


# %%
def calc_rlhf_objective(
    clipped_surrogate: Float[Tensor, ""],
    value_loss: Float[Tensor, ""],
    entropy_bonus: Float[Tensor, ""],
    kl_penalty: Float[Tensor, ""],
) -> Float[Tensor, ""]:
    """The objective the trainer maximises, from the four (positive) terms."""
    # BEGIN SOLUTION
    return clipped_surrogate - value_loss + entropy_bonus - kl_penalty
    # END SOLUTION


# %%
exercises.check_calc_rlhf_objective(calc_rlhf_objective)
