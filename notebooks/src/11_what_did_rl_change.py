# %% [markdown]
# # 11. What did RLHF change?
#
# A run ends with a reward curve and a KL number. Neither says what happened inside the policy:
# which weights moved, which tokens' probabilities changed, or what the policy learnt to do. The
# policy and its reference are both HookedTransformers with the same weight names, so we can
# compare them piece by piece. Here we train the tiny "count the periods" policy of notebook 4 and
# look inside it four ways:
#
# 1. **Which weights moved**: the share of entries whose change exceeds a threshold (and would
#    survive bf16 rounding), and the rank of each matrix's change.
# 2. **Which tokens changed**: KL(trained || reference) at every position of a sampled answer.
# 3. **What direction was learnt**: the mean difference of the residual streams on neutral text,
#    read through the unembedding (the *logit lens*).
# 4. **Whether that direction is the behaviour**: add it to the reference's residual stream
#    (*steering*) and measure the reward.
#
# **What you will learn**
#
# - to measure how much of a model RL changed, and why bf16 hides part of it;
# - to compute a per-token KL over the whole vocabulary and see where in an answer it sits;
# - the logit lens, and the activation-difference lens built on it;
# - to steer a model with a hook on the residual stream, and take the hook off again.
#
# **Reading**
#
# - Mukherjee et al. 2025, *Reinforcement Learning Finetunes Small Subnetworks in Large Language
#   Models* (arXiv:2505.11711): RL updates 5-30% of the parameters, at nearly full rank.
# - Minder et al. 2025, *Narrow Finetuning Leaves Clearly Readable Traces in Activation
#   Differences* (arXiv:2510.13900): the activation-difference lens and steering with it.
# - nostalgebraist 2020, *interpreting GPT: the logit lens* (LessWrong).
# - This repository's `docs/inspection.md` and `minirlhf inspect`.
#
# As before: labels, hints one at a time, the solution collapsed after each check.

# %%
import copy

import matplotlib.pyplot as plt
import torch
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf import RLHFArgs, RLHFTrainer, exercises, inspection, reward_fn_char_count
from minirlhf.sampling import get_samples

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models gain nothing from more threads

# %% [markdown]
# ## A policy to look inside
#
# The 94-character model of notebook 4 ('.' is token 13), two blocks, trained for 8 phases to
# write periods. We keep an untouched copy: the reference. About 10 seconds.

# %%
policy = exercises.load_char_model(n_layers=2, seed=1)
reference = copy.deepcopy(policy)
args = RLHFArgs(total_phases=8, batch_size=32, num_minibatches=4, gen_len=16, warmup_steps=0,
                base_lr=3e-3, head_lr=3e-3, kl_coef=0.05, prefix="A", prepend_bos=False,
                advantage_estimator="gae", gae_lambda=1.0, seed=1)
history = RLHFTrainer(args, reward_fn_char_count, base_model=policy, console=Console(quiet=True),
                      table_every=0).train()
print(f"periods per answer: {history[0]['charts/reward_mean']:.2f} in the first phase, "
      f"{history[-1]['charts/reward_mean']:.2f} in the last")

# %% [markdown]
# ## Exercise 1: the share of weights that moved
#
# Mukherjee et al. count an entry as *updated* when its change exceeds a small tolerance. Write
# the share of entries of a weight whose change |after - before| exceeds `threshold`, as a
# 0-dimensional tensor.
#
# Labels: difficulty 1, importance 4, 5 minutes
#
# Hint: a weight can fall as well as rise: take the absolute value of the change.
#
# Hint: the mean of a boolean tensor (as float) is the share of its True entries.
#
# Predict: This run trains every weight with AdamW for 32 steps. What share of the entries do
# you expect to move by more than 1e-5: about 5%, 30%, or nearly all?
#
# Answer: Nearly all. Adam's step is about the learning rate (3e-3) for every entry with any
# gradient, whatever the gradient's size. The sparsity Mukherjee et al. see comes from much
# smaller learning rates, many fewer steps per entry, and bf16 rounding.


# %%
def calc_changed_share(
    before: Float[Tensor, "..."], after: Float[Tensor, "..."], threshold: float
) -> Float[Tensor, ""]:
    """The share of entries with |after - before| > threshold."""
    # BEGIN SOLUTION
    return ((after - before).abs() > threshold).float().mean()
    # END SOLUTION


# %%
exercises.check_calc_changed_share(calc_changed_share)

# %% [markdown]
# Every weight of the policy, by the library's `get_weight_changes`: the share moved beyond
# 1e-5, the share a bf16 copy would show, and the rank of each change.

# %%
changes = inspection.get_weight_changes(reference, policy)
for change in changes:
    if change.name.startswith("blocks.0") and "W_" in change.name:
        print(f"{change.name:24s} moved {change.frac_changed:6.1%}  in bf16 "
              f"{change.frac_bf16:6.1%}  rank {change.rank}  effective rank "
              f"{change.effective_rank:.1f}")
moved, moved_bf16 = inspection.get_moved_shares(changes)
print(f"all parameters: {moved:.1%} moved, {moved_bf16:.1%} visible in bf16")

# %% [markdown]
# ## Exercise 2: the per-token KL
#
# The trainer logs one KL per answer. Where in the answer does it sit? Write the exact
# KL(trained || reference) at every position, summed over the vocabulary:
#
# $$\mathrm{KL}_t = \sum_v p_t(v) \left(\log p_t(v) - \log p^{\mathrm{ref}}_t(v)\right)$$
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: `log_softmax(dim=-1)` of both logits first; `p = logprobs.exp()`.
#
# Hint: sum over the last axis (the vocabulary), not a mean.


# %%
def calc_per_token_kl(
    logits: Float[Tensor, "batch seq d_vocab"], ref_logits: Float[Tensor, "batch seq d_vocab"]
) -> Float[Tensor, "batch seq"]:
    """KL(trained || reference) at each position, in nats."""
    # BEGIN SOLUTION
    logprobs, ref_logprobs = logits.log_softmax(dim=-1), ref_logits.log_softmax(dim=-1)
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(dim=-1)
    # END SOLUTION


# %%
exercises.check_calc_per_token_kl(calc_per_token_kl)

# %% [markdown]
# The KL at each position of eight answers of the trained policy, each token written in its cell.

# %%
samples = get_samples(policy, "A", batch_size=8, gen_len=16, prepend_bos=False, seed=0)
with torch.no_grad():
    logits, ref_logits = policy(samples.sample_ids), reference(samples.sample_ids)
    kl = calc_per_token_kl(logits[:, :-1], ref_logits[:, :-1])
fig, ax = plt.subplots(figsize=(10, 3.5))
ax.imshow(kl, cmap="Reds", aspect="auto")
for i, row in enumerate(samples.sample_ids[:, 1:].tolist()):
    for t, token in enumerate(row):
        ax.text(t, i, policy.to_single_str_token(token), ha="center", va="center", fontsize=8)
ax.set(xlabel="position in the answer", ylabel="answer", title="KL(trained || reference)")
plt.show()

# %% [markdown]
# ## Exercise 3: the logit lens
#
# The unembedding reads the residual stream after the final LayerNorm. The *logit lens* applies
# the same two steps to any vector of the residual stream: centre it, divide by its RMS (plus
# `eps = 1e-5` under the root), multiply by the norm's gain `ln_w`, add its bias `ln_b`, then
# multiply by `W_U`.
#
# Labels: difficulty 2, importance 5, 10 minutes
#
# Hint: `centred = residual - residual.mean(dim=-1, keepdim=True)`, and the RMS is
# `(centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()`.
#
# Hint: `torch.nn.functional.layer_norm(residual, (d_model,), ln_w, ln_b, eps=1e-5)` does the
# whole norm in one call.


# %%
def apply_logit_lens(
    residual: Float[Tensor, "n d_model"], W_U: Float[Tensor, "d_model d_vocab"],
    ln_w: Float[Tensor, " d_model"], ln_b: Float[Tensor, " d_model"],
) -> Float[Tensor, "n d_vocab"]:
    """Residual vectors read as logits: the final LayerNorm, then the unembedding."""
    # BEGIN SOLUTION
    centred = residual - residual.mean(dim=-1, keepdim=True)
    scale = (centred.pow(2).mean(dim=-1, keepdim=True) + 1e-5).sqrt()
    return (centred / scale * ln_w + ln_b) @ W_U
    # END SOLUTION


# %%
exercises.check_apply_logit_lens(apply_logit_lens)

# %% [markdown]
# **The activation-difference lens.** Run both models on neutral text (here: random characters),
# take the mean of trained minus reference residual stream after each block, and read it with
# your lens.

# %%
neutral = torch.randint(0, 94, (8, 24), generator=torch.Generator().manual_seed(0))
difference = inspection.get_mean_activation_difference(policy, reference, neutral)
lens = apply_logit_lens(difference, reference.W_U.detach(), reference.ln_final.w.detach(),
                        reference.ln_final.b.detach())
for block, logits in enumerate(lens):
    promoted = [reference.to_single_str_token(int(i)) for i in logits.topk(5).indices]
    print(f"block {block}: promoted {promoted}")

# %% [markdown]
# ## Exercise 4: steering the reference
#
# If the mean difference *is* what training learnt, adding it to the reference's residual
# stream should make the reference write periods too. Write the reference's logits with
# `scale * direction` added to the residual stream after block `layer`
# (`blocks.{layer}.hook_resid_post`), at every position, leaving no hook on the model.
#
# Labels: difficulty 2, importance 5, 15 minutes
#
# Hint: a TransformerLens hook is a function `(activation, hook) -> new activation`;
# `model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])` runs it once and removes it.
#
# Hint: after block `layer` is `hook_resid_post` of that block; `hook_resid_pre` of the same
# block is before it.


# %%
def get_steered_logits(
    model: HookedTransformer, tokens: Int[Tensor, "batch seq"], layer: int,
    direction: Float[Tensor, " d_model"], scale: float,
) -> Float[Tensor, "batch seq d_vocab"]:
    """The model's logits with scale * direction added after block `layer`."""
    # BEGIN SOLUTION
    def add(residual, hook):
        return residual + scale * direction

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", add)])
    # END SOLUTION


# %%
exercises.check_get_steered_logits(get_steered_logits)

# %% [markdown]
# The reward of the steered reference, over the scale of the difference, at each block: how much
# of the trained policy's reward does the direction alone bring back?


# %%
def mean_reward(model, fast_path=True, copies=1):
    """Each copy's mean reward over 64 answers (get_steering_rewards samples every setting at
    once, one copy of the prompts each)."""
    return inspection.get_mean_rewards(model, ["A"] * 64, reward_fn_char_count, 16, False, 0,
                                       fast_path, copies)


scales = [0.5, 1.0, 2.0, 4.0]
steered = inspection.get_steering_rewards(reference, difference, [0, 1], scales, mean_reward)
fig, ax = plt.subplots(figsize=(6, 3))
for block in range(2):
    ax.plot([0.0, *scales], [mean_reward(reference).item(), *steered[block]], marker="o",
            label=f"block {block}")
ax.axhline(mean_reward(policy).item(), color="black", linestyle="--", label="trained policy")
ax.set(xlabel="scale of the difference", ylabel="periods per answer")
ax.legend()
plt.show()

# %% [markdown]
# ## Bonus: where to go from here
#
# None of these has a check.
#
# 1. **The whole report.** Train a run with `minirlhf train --preset tiny-smoke --out runs/t`,
#    then `minirlhf inspect --run runs/t` and read `runs/t/inspect/report.md`.
# 2. **Where in the answer.** Does the KL sit at the start of the answer or at the
#    end of the sequence? Average the heatmap's columns over 256 answers.
# 3. **LoRA.** Train the same policy with `lora_rank=2` and compare the rank of each change with
#    the full-weight run's; `inspection.calc_lora_singular_values` reads the adapters directly.
# 4. **Direct logit attribution.** `inspection.get_logit_attribution` with
#    `get_reward_direction(reference, [13])`: which head or MLP writes the period, before and
#    after training?
