# %% [markdown]
# # 4. The trainer: count the periods
#
# The last pieces: an optimiser with two learning rates, a learning-rate schedule, the objective
# assembled from the trainer's models, and the learning phase that takes one PPO step per
# minibatch. Then we plug your objective and learning phase into minirlhf's `RLHFTrainer` and
# train a tiny model to write periods, with and without the KL penalty.
#
# One phase of training:
#
# ```text
# rollout phase:   sample texts -> rewards -> normalise -> advantages -> ReplayMemory
# learning phase:  for each minibatch (batches_per_learning_phase passes x num_minibatches):
#                      objective = clipped_surrogate - value_loss + entropy_bonus - kl_penalty
#                      zero_grad, backward, clip gradients, optimizer.step()
#                  scheduler.step()   (once per phase)
# ```
#
# **What you will learn**
#
# - why the transformer and the value head get different learning rates, and how a schedule
#   warms up and decays them;
# - the order of one PPO step (zero, forward, backward, clip, step) and what breaks when it
#   changes;
# - what the KL penalty buys: a policy that earns reward without leaving the reference behind.
#
# **Reading**
#
# - Loshchilov and Hutter 2019, *Decoupled Weight Decay Regularization* (arXiv:1711.05101): why
#   AdamW rather than Adam with weight decay.
# - Ziegler et al. 2019 (arXiv:1909.08593), section 2.2: the KL penalty.
# - CleanRL's `ppo.py`, the training loop.
# - This repository's `docs/trainer.md` and `docs/metrics.md`.
#
# As before: labels, hints one at a time, the solution collapsed after each check.

# %%
import matplotlib.pyplot as plt
import torch
from jaxtyping import Float
from rich import print as rprint
from rich.console import Console
from torch import Tensor, nn

from minirlhf import (
    RLHFArgs,
    RLHFTrainer,
    exercises,
    get_samples,
    reward_fn_char_count,
)
from minirlhf.advantages import ESTIMATORS, whiten
from minirlhf.losses import get_gen_logprobs
from minirlhf.memory import ReplayMemory, ReplayMinibatch
from minirlhf.models import gather_rollout, get_rollout_outputs
from minirlhf.tracking import make_sample_table
from minirlhf.trainer import Rollout

torch.set_num_threads(1)  # tiny models run faster on one thread than on many

# %% [markdown]
# ## Exercise 1: the optimiser
#
# AdamW with two parameter groups: the transformer (`model.base_model`) at `base_lr` and the
# freshly initialised value head (`model.value_head`) at the larger `head_lr`. The trainer
# **maximises** the objective, so pass `maximize=True` (rather than negating the objective).
#
# Labels: difficulty 1, importance 3, 10 minutes
#
# Hint: AdamW takes a list of parameter groups, dicts `{"params": ..., "lr": ...}`: one for
# `model.base_model.parameters()`, one for `model.value_head.parameters()`.


# %%
def get_optimizer(model: nn.Module, base_lr: float, head_lr: float) -> torch.optim.Optimizer:
    """AdamW over model.base_model (at base_lr) and model.value_head (at head_lr), maximising."""
    # BEGIN SOLUTION
    return torch.optim.AdamW(
        [
            {"params": model.base_model.parameters(), "lr": base_lr},
            {"params": model.value_head.parameters(), "lr": head_lr},
        ],
        maximize=True,
    )
    # END SOLUTION


# %%
exercises.check_get_optimizer(get_optimizer)

# %% [markdown]
# ## Exercise 2: the learning-rate schedule
#
# The schedule is stepped once per phase. Linear warmup over `warmup_steps` phases, then linear
# decay to `final_scale` at the last phase (`total_phases - 1`):
#
# $$\text{scale}(p) = \begin{cases}
#   \dfrac{p + 1}{w} & p < w \\[1ex]
#   1 - (1 - f)\,\dfrac{p - w}{\max(1,\; P - 1 - w)} & p \ge w
# \end{cases}$$
#
# The original design used $p / w$ in the warmup, so its first phase had learning rate 0, and
# divided the decay by $P - w$, so it never reached $f$.
#
# Labels: difficulty 2, importance 2, 10 minutes
#
# Hint: Two branches. Below `warmup_steps`, a ramp that reaches 1 at phase `warmup_steps - 1`;
# from there, a straight line from 1 down to `final_scale` at phase `total_phases - 1`.
#
# Hint: With `warmup_steps = 0` the first branch never runs, so nothing divides by it. The
# `max(1, ...)` keeps the decay defined when a single phase follows the warmup.


# %%
def get_lr_scale(phase: int, warmup_steps: int, total_phases: int, final_scale: float) -> float:
    """The learning-rate multiplier for a phase (0-based)."""
    # BEGIN SOLUTION
    if phase < warmup_steps:
        return (phase + 1) / warmup_steps
    decay_phases = max(1, total_phases - 1 - warmup_steps)
    return 1.0 - (1.0 - final_scale) * min(1.0, (phase - warmup_steps) / decay_phases)
    # END SOLUTION


# %%
exercises.check_get_lr_scale(get_lr_scale)

# %%
phases = range(30)
plt.figure(figsize=(6, 2.5))
plt.plot(phases, [get_lr_scale(p, 5, 30, 0.1) for p in phases], "o-", ms=3)
plt.xlabel("phase")
plt.ylabel("LR scale")
plt.title("warmup_steps=5, total_phases=30, final_scale=0.1")
plt.show()

# %% [markdown]
# ## Exercise 3: optimiser and scheduler
#
# Wrap the schedule in `torch.optim.lr_scheduler.LambdaLR`, which multiplies each group's
# learning rate by `lr_lambda(phase)`. (Watch the spelling: `lr_scheulder` and `lr_lamda` are
# easy typos; the original design had both.)
#
# Labels: difficulty 1, importance 2, 5 minutes
#
# Hint: `torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda phase: get_lr_scale(phase,
# ...))`, reusing your `get_optimizer`.


# %%
def get_optimizer_and_scheduler(
    model: nn.Module,
    base_lr: float,
    head_lr: float,
    warmup_steps: int,
    total_phases: int,
    final_scale: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and a LambdaLR applying get_lr_scale (stepped once per phase)."""
    # BEGIN SOLUTION
    optimizer = get_optimizer(model, base_lr, head_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda=lambda phase: get_lr_scale(phase, warmup_steps, total_phases,
                                                        final_scale)
    )
    return optimizer, scheduler
    # END SOLUTION


# %%
exercises.check_get_optimizer_and_scheduler(get_optimizer_and_scheduler)

# %% [markdown]
# ## Your losses from notebook 3
#
# The objective you assemble next calls four functions by name: `calc_clipped_surrogate_objective`,
# `calc_value_function_loss`, `calc_entropy_bonus` and `calc_kl_penalty`. Paste your own, from
# notebook 3, into the next cell, over the import (until you do, it takes minirlhf's). Every run
# at the end of this notebook then trains with *your* losses, so a bug that only shows in
# training, such as a right value with a wrong gradient, shows in its plots.

# %%
# YOUR LOSSES FROM NOTEBOOK 3: paste your four functions here, over this import.
from minirlhf.losses import (  # noqa: E402
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
)

# %% [markdown]
# ## Exercise 4: the objective, assembled
#
# Every piece of notebooks 1 to 3 meets in one method, `compute_rlhf_objective(self, mb)`, on a
# minibatch `mb` of the replay memory. Write it as a method of the trainer:
#
# 1. `logits, values = self.model.forward_generated(mb.sample_ids, mb.attention_mask,
#    mb.prefix_len, mb.kept)`: the policy's logits, already divided by the temperature, and its
#    values, in the states that chose the generated tokens (`gen_len` of each);
# 2. `logprobs = get_gen_logprobs(logits, mb.sample_ids[:, mb.prefix_len:])`: the log-prob of each
#    generated token under the logits that chose it;
# 3. `ref_logits = self.reference.get_logits(mb.kept)`: the frozen reference's logits (the
#    reference decides whether it kept them or recomputes them);
# 4. the four terms with `args.clip_coef`, `args.vf_coef`, `args.ent_coef`, `args.kl_coef`, and
#    the objective to maximise, with the signs of notebook 3's `calc_rlhf_objective`: your four
#    loss functions, from the cell above.
#
# Return `(objective, stats)`, `stats` a dict of floats for the logs (e.g. each term's
# `.item()`). The check runs it on a policy one step away from the one that sampled, so the
# ratio is not 1 and the KL not 0, and compares the value and the gradient with the trainer's.
#
# Labels: difficulty 2, importance 5, 15 minutes
#
# Hint: `calc_clipped_surrogate_objective(logprobs, mb.logprobs, mb.advantages, args.clip_coef)`:
# `mb.logprobs` are the rollout's (old) log-probs. `calc_value_function_loss(values, mb.returns,
# args.vf_coef)`; `calc_entropy_bonus(logits, args.ent_coef)`;
# `calc_kl_penalty(logits, ref_logits, args.kl_coef)`.
#
# Hint: Keep the objective a tensor (no `.item()` on it): `learning_phase` calls `backward()` on
# it. Only the stats are floats.


# %%
def compute_rlhf_objective(
    self: RLHFTrainer, mb: ReplayMinibatch
) -> tuple[Float[Tensor, ""], dict]:
    """The objective to maximise on one minibatch, and its terms for the logs."""
    # BEGIN SOLUTION
    args = self.args
    logits, values = self.model.forward_generated(mb.sample_ids, mb.attention_mask,
                                                  mb.prefix_len, mb.kept)
    logprobs = get_gen_logprobs(logits, mb.sample_ids[:, mb.prefix_len :])
    ref_logits = self.reference.get_logits(mb.kept)
    terms = {
        "losses/clipped_surrogate": calc_clipped_surrogate_objective(
            logprobs, mb.logprobs, mb.advantages, args.clip_coef),
        "losses/value_loss": calc_value_function_loss(values, mb.returns, args.vf_coef),
        "losses/entropy_bonus": calc_entropy_bonus(logits, args.ent_coef),
        "losses/kl_penalty": calc_kl_penalty(logits, ref_logits, args.kl_coef),
    }
    objective = (terms["losses/clipped_surrogate"] - terms["losses/value_loss"]
                 + terms["losses/entropy_bonus"] - terms["losses/kl_penalty"])
    return objective, {key: term.item() for key, term in terms.items()}
    # END SOLUTION


# %%
exercises.check_compute_rlhf_objective(compute_rlhf_objective)

# %% [markdown]
# ## Exercise 5: the rollout phase
#
# The other half of a phase, also a method of the trainer: sample, score, evaluate, estimate
# advantages, store. With no gradients (`@torch.no_grad()`):
#
# 1. `prompts = self.get_phase_prompts()` and `samples = self.sample(prompts,
#    self.streams.sample, for_training=True)`: the trainer's sampler on this phase's prompts;
# 2. `rewards, loss_mask = self.score(samples, prompts)`: the rewards, and which tokens count
#    (None here: every answer has `gen_len` tokens);
# 3. `outputs = get_rollout_outputs(self.model, self.reference, samples, args.kl_estimator,
#    args.minibatch_size)`: the policy's log-probs and values, the KL (per token,
#    `outputs.exact_kl`) and entropy, and what the models keep for the learning steps
#    (`outputs.kept`: the reference's logits, for one), a minibatch of rows at a time;
# 4. `advantages = self.compute_advantages(gather_rollout(samples, rewards, outputs))`: the
#    rewards normalised, then the estimator of `args.advantage_estimator` (over the batch of
#    every process; here, one process's);
# 5. a `ReplayMemory` of the samples, and `Rollout(memory, samples.texts, rewards, kl, metrics)`
#    with `charts/reward_mean` (the rewards' mean) and `charts/kl` (the exact KL's mean per
#    token) in the metrics, which the plots read, and `kl` the mean KL per answer (per token
#    times `gen_len`), which the adaptive KL controller reads.
#
# The check runs yours and the trainer's from the same random state: the memories and the
# metrics must agree.
#
# Labels: difficulty 2, importance 4, 15 minutes
#
# Hint: `ReplayMemory(samples.sample_ids, samples.attention_mask, outputs.logprobs, advantages,
# outputs.values, outputs.kept, loss_mask)`.
#
# Hint: `self.streams.sample` is the trainer's own random stream: without it every run draws
# different samples and a resumed run cannot repeat them.


# %%
@torch.no_grad()
def rollout_phase(self: RLHFTrainer) -> Rollout:
    """Sample, score, evaluate, estimate advantages: the phase's memory and metrics."""
    # BEGIN SOLUTION
    args = self.args
    prompts = self.get_phase_prompts()
    samples = self.sample(prompts, self.streams.sample, for_training=True)
    rewards, loss_mask = self.score(samples, prompts)
    outputs = get_rollout_outputs(self.model, self.reference, samples, args.kl_estimator,
                                  args.minibatch_size)
    advantages = self.compute_advantages(gather_rollout(samples, rewards, outputs))
    memory = ReplayMemory(samples.sample_ids, samples.attention_mask, outputs.logprobs,
                          advantages, outputs.values, outputs.kept, loss_mask)
    kl = outputs.exact_kl.mean().item()
    metrics = {"charts/reward_mean": rewards.mean().item(), "charts/kl": kl}
    return Rollout(memory, samples.texts, rewards, kl * args.gen_len, metrics)
    # END SOLUTION


# %%
exercises.check_rollout_phase(rollout_phase)

# %% [markdown]
# ## Exercise 6: one learning phase
#
# Write `learning_phase` as a method of the trainer (`self` is an `RLHFTrainer`). Draw the
# minibatches with `memory.get_minibatches(args.num_minibatches,
# args.batches_per_learning_phase, self.streams.shuffle)`. For each one: whiten its advantages
# (mean 0, std 1 over the minibatch, `mb.advantages = whiten(mb.advantages)`) when the
# estimator asks for it (`ESTIMATORS[args.advantage_estimator].whitened`: the ones with a
# value head), zero the gradients, compute `objective, stats = self.compute_rlhf_objective(mb)`
# (the four terms of notebook 3), backpropagate the objective, clip the gradients' global norm
# to `args.max_grad_norm`, and step the optimiser. After the loop, step the scheduler once.
# Return a dict of metrics (for example the mean of each stat over the minibatches).
#
# Labels: difficulty 3, importance 5, 20 minutes
#
# Hint: After the whitening, the loop body is five lines: `self.optimizer.zero_grad()`,
# `objective, stats =
# self.compute_rlhf_objective(mb)`, `objective.backward()`,
# `nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)`,
# `self.optimizer.step()`.
#
# Hint: `self.scheduler.step()` comes after the loop, once. For the metrics, collect each
# minibatch's `stats` and return the mean of each key.


# %%
def learning_phase(self: RLHFTrainer, memory: ReplayMemory) -> dict[str, float]:
    """PPO steps over shuffled minibatches of the memory; returns mean diagnostics."""
    # BEGIN SOLUTION
    args = self.args
    all_stats = []
    minibatches = memory.get_minibatches(
        args.num_minibatches, args.batches_per_learning_phase, self.streams.shuffle
    )
    for mb in minibatches:
        if ESTIMATORS[args.advantage_estimator].whitened:
            mb.advantages = whiten(mb.advantages)
        self.optimizer.zero_grad()
        objective, stats = self.compute_rlhf_objective(mb)
        objective.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.global_step += 1  # counts the steps (a checkpoint records it)
        all_stats.append({**stats, "losses/grad_norm": grad_norm.item()})
    base_lr, head_lr = (group["lr"] for group in self.optimizer.param_groups)
    self.scheduler.step()
    means = {key: sum(s[key] for s in all_stats) / len(all_stats) for key in all_stats[0]}
    return {**means, "charts/lr_base": base_lr, "charts/lr_head": head_lr}
    # END SOLUTION


# %%
exercises.check_learning_phase(learning_phase)

# %% [markdown]
# ## Count the periods
#
# The task: make a model write as many periods as it can. A random GPT-2-sized vocabulary of
# 50,257 tokens gives a random model almost no chance to emit a period, so there is nothing to
# reinforce. Instead we use a tiny random model over GPT-2's 94 printable one-character tokens
# ('!' to '~'; '.' is one of them), from `exercises.load_char_model`, with a prompt of
# in-vocabulary characters ("Q:") and no BOS. A phase takes a fraction of a second on a CPU.
#
# Your `rollout_phase`, `compute_rlhf_objective` and `learning_phase` drive the trainer: a
# subclass swaps them in, so every phase below is your rollout, your objective (computed by
# your notebook 3 losses) and your steps.
#
# Predict: Of the three runs below (no KL penalty, `kl_coef=0.2`, one-step advantages without a
# penalty), which ends with the highest reward, which with the largest KL, and what will the
# samples of the run without a penalty look like?
#
# Answer: The GAE run without a penalty wins on both counts: nothing holds it near the reference,
# so its samples collapse into runs of periods. The penalty trades some reward for a KL that
# levels off; one-step advantages learn slowest. The plots below show it.


# %%
class MyTrainer(RLHFTrainer):
    rollout_phase = rollout_phase
    compute_rlhf_objective = compute_rlhf_objective
    learning_phase = learning_phase


def train(kl_coef: float, advantage_estimator: str = "gae", phases: int = 30) -> MyTrainer:
    args = RLHFArgs(
        total_phases=phases, batch_size=32, num_minibatches=4, gen_len=16, prefix="Q:",
        prepend_bos=False, base_lr=1e-3, head_lr=1e-3, warmup_steps=0, kl_coef=kl_coef,
        advantage_estimator=advantage_estimator, gae_lambda=1.0, seed=1,
    )
    model = exercises.load_char_model(n_layers=1, d_model=32, n_heads=2, seed=0)
    trainer = MyTrainer(args, reward_fn_char_count, base_model=model,
                        console=Console(quiet=True))
    trainer.train()
    return trainer


runs = {
    "no KL penalty (kl_coef=0)": train(kl_coef=0.0),
    "KL penalty (kl_coef=0.2)": train(kl_coef=0.2),
    "one-step advantages, no KL": train(kl_coef=0.0, advantage_estimator="one_step"),
}

# %% [markdown]
# Each trainer keeps its metrics in `trainer.history`, one dict per phase (the keys are
# explained in the docs' metrics page). Reward and KL against phase.
#
# What to expect: with `kl_coef=0.2` the KL levels off below 1 while the runs without a penalty
# climb past 3. If the penalised run's KL climbs with them, your KL penalty has the right value
# but no pull: its gradient is wrong (probability weights detached, say), and training behaves
# as if there were no penalty at all. Notebook 3's check compares gradients too; run it again on
# the function you pasted.

# %%
fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(11, 3.5))
for name, trainer in runs.items():
    ax_reward.plot([m["charts/reward_mean"] for m in trainer.history], label=name)
    ax_kl.plot([m["charts/kl"] for m in trainer.history], label=name)
ax_reward.set(xlabel="phase", ylabel="mean periods per sample", title="charts/reward_mean")
ax_kl.set(xlabel="phase", ylabel="KL(policy || reference)", title="charts/kl")
ax_reward.legend()
fig.tight_layout()
plt.show()
for name, trainer in runs.items():
    print(f"{name}: KL {trainer.history[-1]['charts/kl']:.2f} in the last phase")

# %%
for name, trainer in runs.items():  # fresh samples from each trained policy
    after = get_samples(trainer.model.base_model, "Q:", 3, gen_len=16, prepend_bos=False, seed=0)
    rewards = reward_fn_char_count(after.texts).tolist()
    rprint(make_sample_table(after.texts, rewards, title=name, max_rows=3))

# %% [markdown]
# What to notice:
#
# - **Without the KL penalty** the reward climbs fastest and the policy collapses onto periods:
#   its KL from the reference grows without bound. Here that is the goal; with a real reward model
#   it is *reward hacking*, text that scores well and reads badly.
# - **With the KL penalty** the policy trades reward for staying near the reference: the reward
#   rises more slowly and the KL levels off. `kl_coef` sets the exchange rate.
# - **One-step advantages** learn far more slowly: the reward reaches only the last token until
#   the value head learns to pass it back (notebook 2's plot). GAE with $\lambda = 1$ credits
#   every token at once.
