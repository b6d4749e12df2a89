# %% [markdown]
# # 6. Learning the reward: preferences, a reward model, then PPO against it
#
# So far the reward was a function we wrote down (count the periods, VADER). In RLHF proper
# (Stiennon et al. 2020; Ouyang et al. 2022) nobody can write the reward down: people compare two
# answers and say which is better, a **reward model** learns to score texts so that it agrees
# with those comparisons, and PPO then optimises the policy against the reward model. This
# notebook does the whole pipeline:
#
# 1. **preferences**: pairs (prompt, chosen, rejected). With no human labellers at hand, an *AI
#    judge* labels pairs of the policy's own samples (RLAIF, Bai et al. 2022);
# 2. a **reward model**: the language model with its unembedding replaced by a scalar head,
#    trained with the pairwise loss $-\log\sigma(r_\text{chosen} - r_\text{rejected})$;
# 3. **normalisation** of its rewards on the initial policy's samples;
# 4. **PPO** with the reward model as the reward function.
#
# You write the two pieces of the reward model where the classic bugs live: which position holds
# a sequence's reward, and the pairwise loss.
#
# **What you will learn**
#
# - where a reward model reads a text's reward, for either padding side;
# - the Bradley-Terry pairwise loss, with a margin, computed without underflow;
# - why a learned reward is normalised on the initial policy, and how to tell whether PPO
#   optimised what the labels meant.
#
# **Reading**
#
# - Stiennon et al. 2020, *Learning to summarize from human feedback* (arXiv:2009.01325),
#   section 3.4: the reward model and its loss.
# - Ouyang et al. 2022, *Training language models to follow instructions with human feedback*
#   (arXiv:2203.02155), section 3.5.
# - Bai et al. 2022, *Constitutional AI* (arXiv:2212.08073): preferences from an AI judge.
# - Huang et al. 2024, *The N+ Implementation Details of RLHF with PPO* (arXiv:2403.17031):
#   reward normalisation and where the reward is read.
# - This repository's `docs/reward_model.md`.
#
# As before: labels, hints one at a time, the solution collapsed after each check. The bonus
# exercises at the end close the sequence.

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor

from minirlhf import RLHFArgs, RLHFTrainer, exercises
from minirlhf.pairs.preferences import make_preferences, split_preferences, write_preferences
from minirlhf.pairs.reward_model import RewardModel, make_reward_model_reward_fn
from minirlhf.pairs.reward_training import RewardModelArgs, normalize_on_policy, train_reward_model
from minirlhf.runtime.loading import PRINTABLE_VOCAB, load_tiny_model

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models gain nothing from more threads

# %% [markdown]
# ## The reward model, and where its reward is read
#
# `RewardModel` wraps a `HookedTransformer`. A linear head reads the residual stream after the
# final layernorm (`ln_final.hook_normalized`, the vector the unembedding would read) and gives
# one number per position; the unembedding itself is never computed. Position $p$ has seen the
# tokens up to $p$ only, so the reward of a whole text is the number at its **last real token**.
#
# The reward model appends an end-of-text token (`EOT`, GPT-2's and SmolLM2's `<|endoftext|>`)
# to every text, so the reward is always read at the same kind of token, after the whole text.
# Texts in a batch have different lengths, so they are padded, and the attention mask says which
# positions are real (1) and which are padding (0). The last real token is in a different place
# for each padding side:
#
# ```text
# right padding:  [BOS  This  was  good  EOT   PAD  PAD]   mask 1 1 1 1 1 0 0  -> position 4
# left padding:   [PAD  PAD   BOS  This  was  good  EOT]   mask 0 0 1 1 1 1 1  -> position 6
# ```
#
# Reading the reward at the last column (`rewards[:, -1]`, as the original design does) is right
# for left padding and wrong for right padding: the reward of a short text would then be read at
# a padding position.
#
# ## Exercise 1: the last real token
#
# Return, for each row of the attention mask, the position of its last 1, for either padding side.
# Return integers (`torch.long`): they index a tensor.
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: Make a row of positions with `torch.arange(seq)`. Where the mask is 0, replace the
# position by -1 (`torch.where`); the last real token is then each row's maximum.


# %%
def get_last_token_index(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, " batch"]:
    """Position of each row's last real token. attention_mask: (batch, seq) of 0s and 1s."""
    # BEGIN SOLUTION
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)
    # END SOLUTION


# %%
exercises.check_get_last_token_index(get_last_token_index)

# %% [markdown]
# The library's `RewardModel` uses the same function. A batch scored with right padding, with left
# padding, and each text alone must agree:

# %%
rm_trunk = load_tiny_model(n_layers=1, d_model=32, n_heads=2, n_ctx=64, seed=0)
reward_model = RewardModel(rm_trunk)
texts = ["This movie was fine", "Great", "This movie was a long and rather dull affair"]
with torch.no_grad():
    for side in ["right", "left"]:
        tokens, mask = reward_model.tokenize(texts, padding_side=side)
        print(f"{side:>5} padding: {reward_model(tokens, mask).numpy().round(4)}")
    alone = [reward_model(*reward_model.tokenize([t])).item() for t in texts]
    print(f"        alone: {torch.tensor(alone).numpy().round(4)}")

# %% [markdown]
# ## Exercise 2: the pairwise loss
#
# The Bradley-Terry model says the chosen text wins with probability
# $\sigma(r_\text{chosen} - r_\text{rejected})$. The reward model maximises the log-likelihood of
# the labels, i.e. it **minimises**
#
# $$\mathcal{L} = -\frac{1}{n}\sum_i \log \sigma\big(r^{(i)}_\text{chosen} -
#   r^{(i)}_\text{rejected} - m^{(i)}\big)$$
#
# where the optional margin $m^{(i)} \ge 0$ (Llama 2) asks for a larger gap on pairs that were
# judged clearly different (no margin: $m = 0$). Mind the sign, and keep it finite when the
# rewards are far apart: `torch.log(torch.sigmoid(x))` underflows to $-\infty$ for
# $x \approx -200$; `F.logsigmoid(x)` does not (nor does `F.softplus(-x)`, the same function).
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: Subtract the margin from the difference only when it is not None, then
# `-F.logsigmoid(difference).mean()` (`F` is `torch.nn.functional`).
#
# Predict: What is the loss when the reward model cannot tell the texts apart
# ($r_\text{chosen} = r_\text{rejected}$, no margin)?
#
# Answer: $\log 2 \approx 0.693$: $\sigma(0) = 1/2$. A fresh reward model starts near this; a
# held-out loss that stays there means it learned nothing.


# %%
def calc_pairwise_loss(
    chosen_rewards: Float[Tensor, " batch"],
    rejected_rewards: Float[Tensor, " batch"],
    margin: Float[Tensor, " batch"] | None = None,
) -> Float[Tensor, ""]:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over the pairs (shape (batch,) each)."""
    # BEGIN SOLUTION
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -torch.nn.functional.logsigmoid(difference).mean()
    # END SOLUTION


# %%
exercises.check_calc_pairwise_loss(calc_pairwise_loss)

# %% [markdown]
# ## Preferences from an AI judge (RLAIF)
#
# The policy here is the tiny 94-character model of notebook 4 (one printable character per
# token, so it trains in seconds). The "human" is a judge that prefers texts with more digits.
# `make_preferences` samples two continuations per prompt, lets the judge score both, keeps the
# pair when the scores differ by more than `min_gap` (ties say nothing), and records the higher
# one as chosen. `write_preferences` saves them as JSONL: one `{"prompt", "chosen", "rejected"}`
# object per line, the format a file of human labels would have too.

# %%
def digit_count(samples: list[str]) -> Float[Tensor, " batch"]:
    """The judge: how many digits each text has."""
    return torch.tensor([float(sum(c.isdigit() for c in s)) for s in samples])


policy = load_tiny_model(n_layers=1, d_model=32, n_heads=2, n_ctx=64, seed=0,
                         d_vocab=PRINTABLE_VOCAB)
preferences = make_preferences(policy, digit_count, ["A"], num_pairs=384, gen_len=16,
                               batch_size=64, min_gap=1.0, seed=0, prepend_bos=False)
path = write_preferences(preferences, Path(tempfile.mkdtemp()) / "digit_preferences.jsonl")
print(f"{len(preferences)} pairs written to {path}")
for p in preferences[:3]:
    print(f"chosen {p.chosen!r} ({p.chosen_score:.0f})   rejected {p.rejected!r} "
          f"({p.rejected_score:.0f})")
train, heldout = split_preferences(preferences, heldout_fraction=0.2, seed=0)
print(f"{len(train)} pairs to train on, {len(heldout)} held out")

# %% [markdown]
# ## Training the reward model
#
# The reward model reads *text*, re-tokenized with its own tokenizer. Usually its trunk is the
# policy's own initial weights; here it cannot be, because GPT-2's tokenizer turns the policy's
# character strings into multi-character tokens outside the 94-token vocabulary. So the trunk is
# a tiny model with GPT-2's full vocabulary (its head never computes the 50,257 logits, so it is
# cheap). Each step scores the chosen and rejected texts of a minibatch in one forward pass and
# takes an AdamW step on your loss: `loss_fn=calc_pairwise_loss` below is the function you wrote
# above. **Accuracy** is the share of held-out pairs in which the
# chosen text scores higher: the figure to watch.

# %%
rm_args = RewardModelArgs(epochs=3, batch_size=16, lr=1e-2, head_lr=1e-2, eval_every=5,
                          normalize_samples=64, normalize_prompt="A", normalize_gen_len=16)
torch.manual_seed(0)
reward_model = RewardModel(load_tiny_model(n_layers=1, d_model=32, n_heads=2, n_ctx=64, seed=0))
history = train_reward_model(reward_model, train, heldout, rm_args, console=Console(quiet=True),
                             loss_fn=calc_pairwise_loss)
evals = [m for m in history if "heldout/accuracy" in m]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([m["charts/step"] for m in history], [m["train/accuracy"] for m in history], alpha=0.4,
        label="train minibatch")
ax.plot([m["charts/step"] for m in evals], [m["heldout/accuracy"] for m in evals], "o-",
        label="held-out")
ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="Chosen scored above rejected")
ax.legend()
plt.show()
print(f"held-out accuracy {evals[-1]['heldout/accuracy']:.2f}, "
      f"mean margin r_c - r_r {evals[-1]['heldout/margin']:+.2f}")

# %% [markdown]
# ## Normalising the reward
#
# A reward model's scale and offset are arbitrary: the loss only sees differences. Following "The
# N Implementation Details of RLHF with PPO" (Huang et al. 2024), we fit a gain and a bias so that
# its rewards have mean 0 and standard deviation 1 on samples of the **initial** policy, the
# distribution PPO starts from: $r \mapsto g\,r + b$ with $g = 1/\sigma$, $b = -\mu/\sigma$.

# %%
print(normalize_on_policy(reward_model, policy, rm_args))

# %% [markdown]
# ## PPO against the learned reward
#
# `make_reward_model_reward_fn` freezes the reward model and returns an ordinary reward function
# (texts in, one reward each out, scored in batches on the model's device), so the trainer of
# notebook 4 needs no change. We log the judge's score too: the policy never sees it, and it is
# the real test of whether optimising the learned reward did what the labels meant.

# %%
reward_fn = make_reward_model_reward_fn(reward_model)
args = RLHFArgs(base_model="tiny", prefix="A", total_phases=15, batch_size=32, num_minibatches=2,
                gen_len=16, base_lr=3e-3, head_lr=3e-3, warmup_steps=0, kl_coef=0.0,
                advantage_estimator="gae", gae_lambda=1.0, prepend_bos=False)
trainer = RLHFTrainer(args, reward_fn, base_model=policy, console=Console(quiet=True))
judge_per_phase, last_samples = [], []


def on_phase_end(trainer, rollout):
    """The judge's score of each phase's samples (the policy never sees it)."""
    judge_per_phase.append(digit_count(rollout.texts).mean().item())
    last_samples[:] = rollout.texts


history = trainer.train(on_phase_end=on_phase_end)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([m["charts/reward_mean"] for m in history], "o-", label="learned reward (normalised)")
ax.plot(judge_per_phase, "o-", label="the judge: digits per sample")
ax.set(xlabel="phase", title="PPO against the reward model")
ax.legend()
plt.show()
print(f"digits per sample: {judge_per_phase[0]:.2f} in the first phase, "
      f"{judge_per_phase[-1]:.2f} in the last")
print(last_samples[:4])

# %% [markdown]
# ## The real thing: SmolLM2, VADER and the command line
#
# The same pipeline on SmolLM2-135M, offline, with VADER as the judge and a reward model
# initialised from SmolLM2 itself (about 45 minutes for all three on a 2-core CPU; far less on a
# GPU):
#
# ```bash
# minirlhf preferences --base-model smollm2 --prompt "This movie was" --num-pairs 1200 \
#     --min-gap 0.3 --out prefs.jsonl
# minirlhf reward-model --data prefs.jsonl --base-model smollm2 --out runs/rm
# minirlhf train --reward-model runs/rm --out runs/ppo-rm
# ```
#
# Replace `prefs.jsonl` with your own labels to train on human preferences.
# `benchmarks/reward_model.py` runs all three and measures the held-out accuracy and how far the
# policy's VADER score (the judge PPO never saw) rises; `docs/reward_model.md` has the figures.

# %% [markdown]
# ## Bonus: where to go from here
#
# Each of these builds on a piece you wrote; neither has a check. Notebooks 7 and 8 then take the
# two other roads from here: PPO without its value head (GRPO, RLOO, and a KL estimated from the
# sampled tokens), and preferences without a reward model (DPO).
#
# 1. **Reward over-optimisation.** Run the PPO cell above for 60 phases and plot the learned
#    reward against the judge's score. Does the judge keep rising with the learned reward? (Gao
#    et al. 2022, *Scaling Laws for Reward Model Overoptimization*, arXiv:2210.10760.)
# 2. **A rollout of your own.** Write the rollout phase from your pieces: sample with your
#    `get_samples`, score, `normalize_reward`, values from your `TransformerWithValueHead`,
#    `compute_gae`, and fill your `ReplayMemory`. Compare its tensors with the trainer's on the
#    same seed.
