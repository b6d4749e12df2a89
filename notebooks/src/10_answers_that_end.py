# %% [markdown]
# # 10. Answers that end
#
# Until now every answer had exactly `gen_len` tokens: the sampler wrote that many and stopped,
# and every loss averaged over a rectangle of `batch x gen_len` numbers. Real answers end: the
# model writes its end-of-sequence token (EOS), or a stop string such as a blank line, and
# whatever the sampler produces after that is **padding**, not part of the answer. Once answers
# have different lengths, three questions that fixed length hid need an answer:
#
# 1. **Which tokens are real?** The *response mask* is 1 for each answer's tokens, its EOS
#    included (stopping is a choice the model made, and it must be trained), and 0 after.
# 2. **Where does the reward go?** At each answer's own last real token, not at position
#    `gen_len - 1`; no value is read after it, and the padding's advantage is 0.
# 3. **How is a per-token loss averaged?** Over every real token of the batch, over each answer
#    first, or divided by a constant: three choices the recent papers argue about, because they
#    weigh a token of a short answer differently from a token of a long one.
#
# And one rule holds throughout: **padding never contributes a gradient**.
#
# **What you will learn**
#
# - to build the response mask from the sampled tokens, EOS included;
# - the masked (token-level) mean, and why its gradient, not only its value, must be checked;
# - GAE where every answer ends at its own place;
# - the three aggregations (DAPO's token mean, GRPO's per-answer mean, Dr. GRPO's constant) and
#   the length bias each one has, drawn as the weight each token gets;
# - a tiny policy that learns to end its answers early.
#
# **Reading**
#
# - Yu et al. 2025, *DAPO: An Open-Source LLM Reinforcement Learning System at Scale*
#   (arXiv:2503.14476): token-level loss, clip-higher, overlong filtering and shaping.
# - Liu et al. 2025, *Understanding R1-Zero-Like Training: A Critical Perspective*
#   (arXiv:2503.20783): Dr. GRPO's constant normaliser.
# - Shao et al. 2024, *DeepSeekMath* (arXiv:2402.03300): GRPO's per-answer mean.
# - This repository's `docs/answers.md`.
#
# As before: labels, hints one at a time, the solution collapsed after each check.

# %%
import copy

import matplotlib.pyplot as plt
import torch
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor

from minirlhf import RLHFArgs, RLHFTrainer, exercises

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models gain nothing from more threads

# %% [markdown]
# ## Exercise 1: the response mask
#
# The sampler of notebook 1 gives `gen_tokens`, shape `(batch, gen_len)`. An answer ends at its
# **first** EOS; the mask is 1 up to and including that EOS and 0 after it, whatever tokens
# follow (minirlhf's sampler keeps writing EOS there, but do not rely on it). A row with no EOS
# is *truncated*: it ran out of tokens, and all of it is real.
#
# Labels: difficulty 2, importance 5, 10 minutes
#
# Hint: `is_eos = gen_tokens == eos_id`; the number of EOS seen *before* position t is
# `is_eos.cumsum(dim=1) - is_eos`. A position is real while that is 0.
#
# Hint: return integers (`.long()`): the mask multiplies and selects, and the checks expect
# `torch.long`.
#
# Predict: With EOS = 9, what is the mask of the row `[3, 4, 9, 5, 9]`? And of `[9, 2, 2, 2, 2]`?
#
# Answer: `[1, 1, 1, 0, 0]` (the EOS is the answer's last token; the second 9 is padding), and
# `[1, 0, 0, 0, 0]`: an answer may be its EOS alone, the model choosing to say nothing.


# %%
def get_response_mask(
    gen_tokens: Int[Tensor, "batch gen_len"], eos_id: int
) -> Int[Tensor, "batch gen_len"]:
    """1 for each answer's tokens up to and including its first EOS, 0 after it."""
    # BEGIN SOLUTION
    is_eos = (gen_tokens == eos_id).long()
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).long()
    # END SOLUTION


# %%
exercises.check_get_response_mask(get_response_mask)

# %% [markdown]
# ## Exercise 2: the masked mean
#
# Every term of the objective is a mean of a per-token quantity. With a mask it is the mean over
# the real tokens of the whole batch:
#
# $$\bar x = \frac{\sum_{i,t} m_{i,t}\, x_{i,t}}{\sum_{i,t} m_{i,t}}$$
#
# This is DAPO's *token-level* mean: every real token of the batch counts once. The check compares
# the **gradient** too: a padded tensor often holds 0.0 at the padding, and then
# `values.sum() / mask.sum()` has the right value but gives every padding position a gradient.
#
# Labels: difficulty 1, importance 5, 10 minutes
#
# Hint: `torch.where(response_mask.bool(), values, 0.0)` keeps the real tokens and puts an exact
# 0 (with gradient 0) at the padding, even where the padding holds inf or NaN.
#
# Hint: divide the sum of that by `response_mask.sum()`, the number of real tokens.


# %%
def masked_mean(
    values: Float[Tensor, "batch gen_len"], response_mask: Int[Tensor, "batch gen_len"]
) -> Float[Tensor, ""]:
    """The mean of `values` over the real tokens of the batch (mask 1)."""
    # BEGIN SOLUTION
    real = response_mask.bool()
    return torch.where(real, values, 0.0).sum() / real.sum()
    # END SOLUTION


# %%
exercises.check_masked_mean(masked_mean)

# %% [markdown]
# ## Exercise 3: GAE where answers end
#
# Notebook 2's GAE put the reward at the last position and read $V(s_{t+1})$ everywhere. Now
# answer $i$ has $L_i$ real tokens. At its last one, $t = L_i - 1$, the reward arrives and the
# episode is over (no value follows); the positions after it get advantage 0:
#
# $$\delta_t = \begin{cases} r_i - V(s_t) & t = L_i - 1\\
#   \gamma V(s_{t+1}) - V(s_t) & t < L_i - 1\end{cases}, \qquad
#   A_t = \delta_t + \gamma\lambda A_{t+1}, \qquad A_t = 0 \text{ for } t \ge L_i.$$
#
# Here `values[:, t]` is $V(s_t)$, the value of the state that chose token t (one per generated
# token), so no `prefix_len` slicing.
#
# Labels: difficulty 3, importance 5, 20 minutes
#
# Hint: the lengths are `response_mask.sum(dim=1)`; `F.one_hot(lengths - 1, gen_len)` marks each
# answer's last token (where the reward goes).
#
# Hint: the next state's value counts only where the next position is real: shift the mask left
# by one (`torch.nn.functional.pad(mask[:, 1:], (0, 1))`) and multiply. Zero every delta on the
# padding, then run the backward sum of notebook 2.


# %%
def compute_gae_with_ends(
    values: Float[Tensor, "batch gen_len"], rewards: Float[Tensor, " batch"],
    response_mask: Int[Tensor, "batch gen_len"], gamma: float = 1.0, gae_lambda: float = 0.95,
) -> Float[Tensor, "batch gen_len"]:
    """GAE with the reward at each answer's last real token, no value after it, 0 on padding."""
    # BEGIN SOLUTION
    mask = response_mask.float()
    gen_len = values.shape[1]
    ends = torch.nn.functional.one_hot(response_mask.sum(dim=1) - 1, gen_len).float()
    next_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = (rewards[:, None] * ends + gamma * next_values * next_mask - values) * mask
    advantages, running = torch.zeros_like(values), torch.zeros_like(rewards)
    for t in reversed(range(gen_len)):
        running = deltas[:, t] + gamma * gae_lambda * running
        advantages[:, t] = running
    return advantages
    # END SOLUTION


# %%
exercises.check_compute_gae_with_ends(compute_gae_with_ends)

# %% [markdown]
# ## Exercise 4: three aggregations
#
# With $B$ answers of lengths $L_i$ and $N = \sum_i L_i$ real tokens:
#
# - `"token_mean"` (DAPO): $\frac{1}{N}\sum_i \sum_{t < L_i} x_{i,t}$, your masked mean;
# - `"sequence_mean"` (the original GRPO): $\frac{1}{B}\sum_i \frac{1}{L_i}\sum_{t < L_i}
#   x_{i,t}$, each answer's mean, then the mean over answers;
# - `"constant"` (Dr. GRPO): $\frac{1}{B \cdot \text{gen\_len}}\sum_i \sum_{t < L_i} x_{i,t}$,
#   a divisor fixed before sampling.
#
# Without padding (every $L_i$ = gen_len) all three are the plain mean.
#
# Labels: difficulty 2, importance 4, 15 minutes
#
# Hint: compute the per-answer sums `torch.where(real, values, 0.0).sum(dim=1)` and lengths
# `real.sum(dim=1)` once; each aggregation is one line of them.
#
# Hint: `"constant"` divides by `response_mask.numel()`, which is `B * gen_len`.


# %%
def aggregate(
    values: Float[Tensor, "batch gen_len"], response_mask: Int[Tensor, "batch gen_len"],
    how: str = "token_mean",
) -> Float[Tensor, ""]:
    """A per-token quantity averaged over the real tokens, by `how`."""
    # BEGIN SOLUTION
    real = response_mask.bool()
    sums, lengths = torch.where(real, values, 0.0).sum(dim=1), real.sum(dim=1)
    if how == "token_mean":
        return sums.sum() / lengths.sum()
    if how == "sequence_mean":
        return (sums / lengths).mean()
    return sums.sum() / response_mask.numel()
    # END SOLUTION


# %%
exercises.check_aggregate(aggregate)

# %% [markdown]
# ## Exercise 5: the weight of a token, and the length bias
#
# Each aggregation is a weighted sum $\sum_{i,t} w_{i,t}\, x_{i,t}$, and the weight
# $w_{i,t} = \partial(\text{loss}) / \partial x_{i,t}$ is how hard the gradient pushes on that
# token. Write the weights as formulas (not with autograd):
#
# $$w^{\text{token}}_{i,t} = \frac{1}{N}, \qquad w^{\text{sequence}}_{i,t} = \frac{1}{B\,L_i},
#   \qquad w^{\text{constant}}_{i,t} = \frac{1}{B \cdot \text{gen\_len}}$$
#
# on real tokens, and 0 on padding.
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: `lengths = response_mask.sum(dim=1, keepdim=True)` broadcasts against the rows; multiply
# each formula by `response_mask` to zero the padding.
#
# Predict: One answer of 8 tokens and one of 2. Under `sequence_mean`, how many times heavier is
# a token of the short answer than a token of the long one? Under the other two?
#
# Answer: 4 times (1/(2·2) against 1/(2·8)): GRPO's per-answer mean pushes hardest on short
# answers, which rewards a correct short answer more per token and punishes a wrong long one
# less per token. That is the length bias Liu et al. point out. Under token_mean and constant
# every real token weighs the same.


# %%
def get_token_weights(
    response_mask: Int[Tensor, "batch gen_len"], how: str
) -> Float[Tensor, "batch gen_len"]:
    """The weight `aggregate(values, response_mask, how)` gives each token: its gradient."""
    # BEGIN SOLUTION
    mask = response_mask.float()
    batch, gen_len = mask.shape
    lengths = mask.sum(dim=1, keepdim=True)
    if how == "token_mean":
        return mask / mask.sum()
    if how == "sequence_mean":
        return mask / (batch * lengths)
    return mask / (batch * gen_len)
    # END SOLUTION


# %%
exercises.check_get_token_weights(get_token_weights)

# %% [markdown]
# The weights of a long answer (8 tokens) and a short one (2 tokens), side by side. The bars are
# the weight of one token of each; the padding's is 0 under every aggregation.

# %%
mask = torch.tensor([[1] * 8, [1, 1] + [0] * 6])
hows = ["token_mean", "sequence_mean", "constant"]
weights = {how: get_token_weights(mask, how) for how in hows}
fig, ax = plt.subplots(figsize=(7, 3))
for k, (row, label) in enumerate([(0, "long answer (8 tokens)"), (1, "short answer (2 tokens)")]):
    ax.bar([i + 0.35 * k for i in range(3)], [weights[how][row, 0].item() for how in hows],
           width=0.35, label=label)
ax.set_xticks([i + 0.175 for i in range(3)], hows)
ax.set_ylabel("weight of one token")
ax.legend()
plt.show()
for how in hows:  # autograd of your aggregate agrees with the formulas
    values = torch.zeros(2, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(aggregate(values, mask, how), values)
    print(f"{how:14s} long {grad[0, 0].item():.4f}  short {grad[1, 0].item():.4f}  "
          f"padding {grad[1, 5].item():.1f}")

# %% [markdown]
# ## A policy that learns to stop
#
# The 94-character model of the earlier notebooks has no EOS in its vocabulary, so here it gets
# one: its tokenizer's EOS becomes the period (id 13). The reward pays for short answers
# (`-len(response) / gen_len`; the response comes without its EOS), and `stop_at_eos=True` ends
# each answer at its first period. Watch the mean length and the share of truncated answers
# (`charts/response_length`, `charts/frac_truncated`) fall. A few seconds.

# %%
model = exercises.load_char_model(seed=1)
model.tokenizer = copy.deepcopy(model.tokenizer)  # a private copy: the shared one keeps its EOS
model.tokenizer.eos_token = "."
args = RLHFArgs(total_phases=12, batch_size=32, num_minibatches=2, gen_len=8, prefix="a",
                prepend_bos=False, warmup_steps=0, seed=0, base_lr=1e-2, head_lr=1e-2,
                kl_coef=0.0, stop_at_eos=True)


def pay_for_short_answers(responses: list[str]) -> list[float]:
    return [-len(response) / args.gen_len for response in responses]


trainer = RLHFTrainer(args, pay_for_short_answers, base_model=model, console=Console(quiet=True),
                      table_every=0)
history = trainer.train()
lengths = [m["charts/response_length"] for m in history]
truncated = [m["charts/frac_truncated"] for m in history]
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
left.plot(lengths)
left.set(xlabel="phase", ylabel="mean answer length (tokens)")
right.plot(truncated)
right.set(xlabel="phase", ylabel="share truncated")
plt.show()
print(f"mean length {lengths[0]:.2f} -> {lengths[-1]:.2f}, truncated {truncated[0]:.2f} -> "
      f"{truncated[-1]:.2f}; the sampler's and the rollout's log-probs differ by at most "
      f"{max(m['charts/logprob_gap_max'] for m in history)}")

# %% [markdown]
# ## Bonus: where to go from here
#
# The end of the sequence, for real this time. None of these has a check.
#
# 1. **Truncated answers.** Train with `gen_len=4` so that many answers never end, once with
#    `truncation="mask"` (DAPO's overlong filtering: a truncated answer leaves the loss) and once
#    with `truncation="penalty"` (DAPO's soft overlong punishment). Which lowers
#    `charts/frac_truncated` faster?
# 2. **The length bias, measured.** Run the demo above with each `loss_aggregation` and a reward
#    that pays for long answers instead; does `sequence_mean` lengthen the answers more slowly?
# 3. **Clip-higher.** Set `clip_coef_high=0.28` and compare `charts/entropy` over the phases with
#    the symmetric clip. DAPO reports that the higher clip keeps the entropy from collapsing.
# 4. **Zero-spread groups.** With `advantage_estimator="grpo"`, `group_size=4` and
#    `drop_zero_spread=True`, what share of groups (`charts/frac_reward_zero_std`) teaches
#    nothing once the policy always stops at once?
