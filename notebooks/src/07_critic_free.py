# %% [markdown]
# # 7. Without a critic: GRPO, RLOO and the sampled KL
#
# The PPO of notebooks 1 to 4 trains two networks: the policy, and a value head that predicts,
# for every prefix, the reward the finished text will get. The value is a **baseline**: the
# policy gradient $\mathbb{E}\big[(R - b)\,\nabla_\theta \log\pi_\theta(y)\big]$ stays unbiased
# for any $b$ that does not depend on the text $y$, and a good $b$ makes it far less noisy. The
# critic-free methods keep PPO's clipped ratio and drop the value head; they get $b$ from the
# samples themselves, by sampling **each prompt several times** and comparing the samples of a
# prompt with each other.
#
# **Why drop the critic.** A language model's reward arrives once, at the end, which is where a
# learnt value helps least; the value head starts random, so its first phases give noisy
# advantages; it needs its own learning rate, coefficient and warm-up; and in the large systems
# the critic is a second copy of the model, in memory and in compute.
#
# **What they pay.** More samples: $G$ per prompt (GRPO's group, `group_size`), where PPO can use
# one. A coarser credit: every token of a text gets the same advantage (the value head could
# tell the good tokens from the bad). And nothing at all from a prompt whose samples all scored
# the same (the group's advantages are then 0).
#
# In this notebook you write the two group baselines, GRPO's (with Dr. GRPO's variant) and
# RLOO's, and the three sampled estimators of the KL these methods usually use, $k_1$, $k_2$ and
# $k_3$; you measure by sampling which of them are unbiased and which are noisy; then the trainer
# runs your pieces on a task where the prompts differ in how easy they are.
#
# **What you will learn**
#
# - why a baseline must come from the samples of the *same* prompt, and what goes wrong when it
#   comes from the whole batch;
# - GRPO's group normalisation, Dr. GRPO's objection to its std, and RLOO's leave-one-out mean;
# - three ways to estimate a KL from the sampled tokens alone, and which to trust for what;
# - which of them, used as a loss, have the KL's gradient, on-policy and off-policy (the KL lab).
#
# **Reading**
#
# - Shao et al. 2024, *DeepSeekMath* (arXiv:2402.03300), section 4.1: GRPO.
# - Liu et al. 2025, *Understanding R1-Zero-Like Training: A Critical Perspective*
#   (arXiv:2503.20783): Dr. GRPO.
# - Ahmadian et al. 2024, *Back to Basics: Revisiting REINFORCE Style Optimization for Learning
#   from Human Feedback in LLMs* (arXiv:2402.14740): RLOO.
# - Schulman 2020, *Approximating KL Divergence* (blog post): $k_1$, $k_2$, $k_3$.
# - This repository's `docs/critic_free.md`.
#
# As before: labels, hints one at a time, the solution collapsed after each check.

# %%
import matplotlib.pyplot as plt
import torch
from jaxtyping import Float
from rich.console import Console
from torch import Tensor
from torch.distributions import Categorical, kl_divergence

from minirlhf import RLHFArgs, RLHFTrainer, exercises, normalize_reward
from minirlhf.losses import calc_clipped_surrogate_objective, get_gen_logprobs

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models gain nothing from more threads

# %% [markdown]
# ## Groups
#
# Each phase samples `prompts_per_phase` prompts, each `group_size` times ($G$), and the samples
# of one prompt sit in **adjacent rows**: with $G = 4$, rows 0 to 3 are the first prompt's, rows
# 4 to 7 the second's, and so on (group $g$ is rows $gG, \dots, gG + G - 1$). The rewards of a
# batch of $n$ samples are therefore one row per prompt after `rewards.view(-1, group_size)`
# (shape `(n / G, G)`; `einops.rearrange(rewards, "(group size) -> group size", size=G)` says
# the same in words).
#
# ## Exercise 1: GRPO's group advantages (and Dr. GRPO's)
#
# GRPO gives sample $i$ of a prompt, with reward $r_i$, the advantage
#
# $$A_i = \frac{r_i - \operatorname{mean}(r_1, \dots, r_G)}{\operatorname{std}(r_1, \dots, r_G)
#   + \epsilon}$$
#
# where the mean and the **sample** standard deviation (divided by $G - 1$, torch's default)
# are those of its own prompt's group. Every token of the text gets that advantage. Dr. GRPO
# (`scale_by_std=False`) keeps the numerator only, $A_i = r_i - \operatorname{mean}$: dividing by
# the std makes a prompt whose samples barely differ push as hard as one whose samples differ a
# lot, which Liu et al. argue biases training towards questions that are too easy or too hard.
#
# A prompt whose samples all scored the same has std 0; its advantages must come out 0 (it
# teaches nothing), not NaN: that is what $\epsilon$ is for.
#
# Labels: difficulty 2, importance 5, 15 minutes
#
# Hint: `groups = rewards.view(-1, group_size)` gives one row per prompt; take the mean and the
# std over `dim=1` with `keepdim=True`, so they broadcast against the rows.
#
# Hint: `centred = groups - groups.mean(dim=1, keepdim=True)`; divide it by
# `groups.std(dim=1, keepdim=True) + eps` only when `scale_by_std`; return `.flatten()`, one
# advantage per sample in the original order.
#
# Predict: Rewards `[1, 2, 3, 4, 0, 0, 4, 4]` with $G = 4$ (two prompts). Which sample has the
# largest GRPO advantage, and is it the one with the largest reward?
#
# Answer: Sample 3 (reward 4 in the first group): $(4 - 2.5)/1.29 = 1.16$. Samples 6 and 7 also
# scored 4, but their group's mean is 2 and its std 2.31, so they get $0.87$. The advantage says
# how much better than the *other answers to the same prompt* a text did.


# %%
def compute_group_advantages(
    rewards: Float[Tensor, " batch"], group_size: int, scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Float[Tensor, " batch"]:
    """(r - mean of its group) / (sample std of its group + eps), groups of adjacent rows; without
    the division when not scale_by_std (Dr. GRPO)."""
    # BEGIN SOLUTION
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()
    # END SOLUTION


# %%
exercises.check_compute_group_advantages(compute_group_advantages)

# %% [markdown]
# ## Exercise 2: RLOO's leave-one-out baseline
#
# GRPO's mean includes the sample's own reward, so its baseline depends on the action it judges
# (a little: by $1/G$). RLOO (REINFORCE leave-one-out) takes the mean of the **other** $G - 1$
# samples of the prompt:
#
# $$A_i = r_i - \frac{1}{G - 1}\sum_{j \ne i} r_j$$
#
# That baseline is independent of sample $i$, so the gradient estimate is exactly unbiased. No
# std, no normalisation. (Some algebra shows $A_i = \frac{G}{G-1}(r_i - \bar r)$: Dr. GRPO's
# advantage, scaled up a little.)
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: The sum of the others is the group's sum minus the sample itself:
# `groups.sum(dim=1, keepdim=True) - groups`.
#
# Hint: Divide that by `group_size - 1` (the number of *other* samples), subtract it from
# `groups`, and `.flatten()`.


# %%
def compute_rloo_advantages(
    rewards: Float[Tensor, " batch"], group_size: int
) -> Float[Tensor, " batch"]:
    """r minus the mean of the other group_size - 1 rewards of its prompt (adjacent rows)."""
    # BEGIN SOLUTION
    groups = rewards.view(-1, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).flatten()
    # END SOLUTION


# %%
exercises.check_compute_rloo_advantages(compute_rloo_advantages)

# %% [markdown]
# The three baselines side by side, on the rewards of the prediction above:

# %%
rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 4.0, 4.0])
print("GRPO     ", compute_group_advantages(rewards, 4).numpy().round(3))
print("Dr. GRPO ", compute_group_advantages(rewards, 4, scale_by_std=False).numpy().round(3))
print("RLOO     ", compute_rloo_advantages(rewards, 4).numpy().round(3))
print("RLOO / Dr. GRPO =", (compute_rloo_advantages(rewards, 4)
                            / compute_group_advantages(rewards, 4, scale_by_std=False))[0].item(),
      "= G / (G - 1)")

# %% [markdown]
# ## Exercise 3: the KL from the sampled tokens
#
# Notebook 3's penalty sums $\pi_\theta \log(\pi_\theta / \pi_\text{ref})$ over the whole
# vocabulary at every position. GRPO and its relatives usually estimate the KL from the
# **sampled** token $x \sim \pi_\theta$ alone, which needs only two numbers per token, the
# log-probs `logprobs` $= \log\pi_\theta(x)$ and `ref_logprobs` $= \log\pi_\text{ref}(x)$. With
# the ratio $r = \pi_\text{ref}(x) / \pi_\theta(x)$ (reference over policy), Schulman's three
# estimators are
#
# $$k_1 = -\log r, \qquad k_2 = \tfrac12 (\log r)^2, \qquad k_3 = (r - 1) - \log r.$$
#
# Write each one **per token** (shape `(batch, gen_len)`, no mean: the trainer averages and
# multiplies by `kl_coef`), with the gradient kept (they are used as losses). Compute $\log r$
# as a difference of log-probs: $\pi(x)$ itself underflows to 0 for an unlikely token, and
# $0/0$ is NaN.
#
# Labels: difficulty 1, importance 4, 10 minutes
#
# Hint: `log_r = ref_logprobs - logprobs`. Then $k_1$ is `-log_r`, $k_2$ is `0.5 * log_r**2`,
# and $k_3$ is `log_r.exp() - 1 - log_r`.


# %%
def calc_kl_k1(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """k1 = -log r = log p(x) - log p_ref(x), per token."""
    # BEGIN SOLUTION
    return logprobs - ref_logprobs
    # END SOLUTION


# %%
exercises.check_calc_kl_k1(calc_kl_k1)


# %%
def calc_kl_k2(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """k2 = (log r)^2 / 2, per token."""
    # BEGIN SOLUTION
    return 0.5 * (ref_logprobs - logprobs) ** 2
    # END SOLUTION


# %%
exercises.check_calc_kl_k2(calc_kl_k2)


# %%
def calc_kl_k3(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """k3 = (r - 1) - log r with r = p_ref(x) / p(x), per token."""
    # BEGIN SOLUTION
    log_r = ref_logprobs - logprobs
    return log_r.exp() - 1 - log_r
    # END SOLUTION


# %%
exercises.check_calc_kl_k3(calc_kl_k3)

# %% [markdown]
# ## Which estimator to trust? Sample and see
#
# An estimator is **unbiased** if its mean over $x \sim \pi_\theta$ is the KL, and **low
# variance** if one sample's estimate is rarely far from it. `torch.distributions` gives us both
# sides: draw tokens from a categorical $\pi_\theta$, score them under $\pi_\text{ref}$ with
# `log_prob`, and compare the estimators' means and standard deviations with the exact
# `kl_divergence`. Two settings: a reference close to the policy (early in training) and one far
# from it (a policy that has drifted).
#
# Predict: Which estimators average to the exact KL in both settings? Which one can be negative
# for a single token, and which has the smallest spread?
#
# Answer: $k_1$ and $k_3$ are unbiased: $\mathbb{E}[k_1] = \mathbb{E}[\log(\pi_\theta /
# \pi_\text{ref})]$ is the KL by definition, and $\mathbb{E}[r] = 1$ makes
# $\mathbb{E}[k_3] = \mathbb{E}[k_1]$. $k_1$ is negative whenever the reference likes the token
# more than the policy does, so its spread is large. $k_2$ and $k_3$ are never negative and
# vary little; $k_2$ is close to the KL only while the two distributions are close, and drifts
# off (here, above it) when they are far apart.

# %%
policy_logits = torch.randn(20, generator=torch.Generator().manual_seed(0))
settings = {"close to": policy_logits + 0.2 * torch.randn(20, generator=torch.Generator()
                                                          .manual_seed(1)),
            "far from": policy_logits + 1.5 * torch.randn(20, generator=torch.Generator()
                                                        .manual_seed(2))}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for ax, (name, ref_logits) in zip(axes, settings.items()):
    policy, reference = Categorical(logits=policy_logits), Categorical(logits=ref_logits)
    torch.manual_seed(0)
    tokens = policy.sample((100_000,))  # x ~ the policy
    logprobs, ref_logprobs = policy.log_prob(tokens)[None], reference.log_prob(tokens)[None]
    exact = kl_divergence(policy, reference).item()
    print(f"reference {name} the policy: exact KL(policy || reference) = {exact:.4f}")
    for label, estimator in [("k1", calc_kl_k1), ("k2", calc_kl_k2), ("k3", calc_kl_k3)]:
        estimates = estimator(logprobs, ref_logprobs)[0]
        print(f"  {label}: mean {estimates.mean():.4f}  std {estimates.std():.4f}  "
              f"negative for {(estimates < 0).float().mean():.0%} of tokens")
        ax.hist(estimates.numpy(), bins=60, range=(-2, 3), alpha=0.5, label=label)
    ax.axvline(exact, color="black", linestyle="--", label="exact KL")
    ax.set(title=f"reference {name} the policy", xlabel="one token's estimate")
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Values are not gradients, though. As a *loss* (differentiated at the sampled token, the sample
# itself not differentiated), $k_1$'s expected gradient is 0, $k_2$'s is the exact KL's gradient
# although its value is biased, and $k_3$'s is the gradient of the *reverse* KL,
# $\mathrm{KL}(\pi_\text{ref} \,\|\, \pi_\theta)$. `docs/critic_free.md` derives all three. GRPO
# uses $k_3$ in its loss.
#
# ## The KL lab: values and gradients, on-policy and off
#
# The learning phase reuses each rollout for several passes over its minibatches, so after the
# first step the tokens were sampled by an **older** policy $\mu$, not by $\pi_\theta$: the KL
# term is off-policy. The importance ratio $\rho = \pi_\theta(x)/\mu(x)$ corrects for that.
# DeepSeek-V3.2 (and TRL's `use_bias_correction_kl`) multiply $k_3$ by it:
#
# $$k_3^\text{IS} = \frac{\pi_\theta(x)}{\mu(x)}\,\big((r - 1) - \log r\big), \qquad
# r = \pi_\text{ref}(x)/\pi_\theta(x).$$
#
# Write it per token, from the log-probs, with the gradient kept **through the ratio too**: on
# a rollout's own samples (`old_logprobs` equal to `logprobs`) the ratio is 1 in value, but not in
# gradient.
#
# Labels: difficulty 2, importance 4, 10 minutes
#
# Hint: `(logprobs - old_logprobs).exp() * k3`, with `k3` from your `calc_kl_k3`.


# %%
def calc_kl_k3_is(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"],
    old_logprobs: Float[Tensor, "batch gen_len"],
) -> Float[Tensor, "batch gen_len"]:
    """k3 times the importance ratio pi(x) / mu(x), per token."""
    # BEGIN SOLUTION
    return (logprobs - old_logprobs).exp() * calc_kl_k3(logprobs, ref_logprobs)
    # END SOLUTION


# %%
exercises.check_calc_kl_k3_is(calc_kl_k3_is)

# %% [markdown]
# Now measure, without sampling noise. On a toy categorical $\pi_\theta = \mathrm{softmax}(\theta)$
# over 7 outcomes, an estimator's **expected** value is the exact sum $\sum_x q(x)\,k(x)$ over
# the outcomes, with $q$ the sampling distribution ($\pi_\theta$ on-policy, $\mu$ off-policy),
# and its expected gradient as a loss is the gradient of that sum **with $q$ held fixed**: the
# samples are drawn, not computed, so the gradient flows only through the estimate at $x$.
# Write `expected_kl_gradient`: the estimator takes `(logprobs, ref_logprobs, old_logprobs)`
# shaped `(1, outcomes)` (one "answer" whose positions are the outcomes); on-policy
# (`old_theta=None`) the sampler's log-probs are the policy's, detached.
#
# Labels: difficulty 3, importance 4, 15 minutes
#
# Hint: `theta = theta.detach().requires_grad_(True)`, `logprobs = theta.log_softmax(-1)`, and
# `old_logprobs` is `logprobs.detach()` or `old_theta.log_softmax(-1)`.
#
# Hint: `(old_logprobs.exp() * estimator(logprobs[None], ref_logprobs[None],
# old_logprobs[None])[0]).sum().backward()`, then return `theta.grad`.


# %%
def expected_kl_gradient(estimator, theta: Float[Tensor, " outcomes"],
                         ref_logits: Float[Tensor, " outcomes"],
                         old_theta: Float[Tensor, " outcomes"] | None = None
                         ) -> Float[Tensor, " outcomes"]:
    """The gradient wrt theta of sum_x q(x) estimator(x), q = softmax(old_theta) (or the policy
    itself, when None) held fixed."""
    # BEGIN SOLUTION
    theta = theta.detach().requires_grad_(True)
    logprobs = theta.log_softmax(-1)
    old_logprobs = logprobs.detach() if old_theta is None else old_theta.log_softmax(-1)
    estimates = estimator(logprobs[None], ref_logits.log_softmax(-1)[None], old_logprobs[None])
    (old_logprobs.exp() * estimates[0]).sum().backward()
    return theta.grad
    # END SOLUTION


# %%
exercises.check_expected_kl_gradient(expected_kl_gradient)

# %% [markdown]
# Predict: Compare each estimator's expected gradient with the exact KL's (autograd of
# `kl_divergence`). Which match on-policy, and which still match when an older policy sampled?
# What happens to $k_3^\text{IS}$ if you detach its ratio?
#
# Answer: On-policy $k_2$ and $k_3^\text{IS}$ match; $k_1$'s expected gradient is 0 and
# $k_3$'s is the reverse KL's. Off-policy only $k_3^\text{IS}$ matches: its expectation under
# $\mu$ is $\sum_x \pi_\theta(x)\,k_3(x)$, which is the KL for every $\theta$, so its gradient is
# the KL's. Detach the ratio and its gradient is $k_3$'s again, the reverse KL's, although
# every value is unchanged: a check on values alone would pass it.

# %%
lab = torch.Generator().manual_seed(3)
theta, ref_logits = torch.randn(7, generator=lab), torch.randn(7, generator=lab)
old_theta = theta + 0.7 * torch.randn(7, generator=lab)
leaf = theta.clone().requires_grad_(True)
kl_divergence(Categorical(logits=leaf), Categorical(logits=ref_logits)).backward()
lab_estimators = {
    "k1": lambda lp, ref, old: calc_kl_k1(lp, ref),
    "k2": lambda lp, ref, old: calc_kl_k2(lp, ref),
    "k3": lambda lp, ref, old: calc_kl_k3(lp, ref),
    "k3_is": calc_kl_k3_is,
    "k3_is, ratio detached": lambda lp, ref, old: (lp - old).exp().detach() * calc_kl_k3(lp, ref),
}
print("largest gap to the exact KL's gradient:   on-policy   off-policy")
for name, estimator in lab_estimators.items():
    gaps = [(expected_kl_gradient(estimator, theta, ref_logits, old) - leaf.grad).abs().max()
            for old in (None, old_theta)]
    print(f"  {name:22s}                   {gaps[0]:9.2e}   {gaps[1]:9.2e}")

# %% [markdown]
# minirlhf offers $k_3^\text{IS}$ as `kl_estimator="k3_is"`: the learning steps hand `calc_kl`
# the rollout's log-probs as $\mu$. `tests/test_kl_lab.py` pins the whole table (values too, and
# $k_1\rho$, $k_2\rho$), and `docs/critic_free.md` has it.
#
# ## Your pieces in the trainer
#
# The task of notebook 4 with a twist: write periods, after one of eight prompts `"A"` to `"H"`,
# and a judge that is generous to some prompts: it adds 4 points per letter after `"A"` (a text
# after `"H"` gets 28 points before it writes a single period). Easy prompts and hard ones, like
# a maths set. Each phase samples every prompt $G = 4$ times (32 samples).
#
# A subclass of `RLHFTrainer` puts your functions in: `compute_advantages` calls your GRPO,
# Dr. GRPO or RLOO and gives every token of a text its text's advantage, and
# `compute_rlhf_objective` is GRPO's: the clipped surrogate minus `kl_coef` times the mean of
# your $k_3$. There is no value head (the critic-free estimators turn it off: no value loss, one
# learning rate). Four runs: your three estimators, and your GRPO with
# **one group for the whole batch**, i.e. a baseline from every prompt's samples (the
# per-prompt baseline taken away).
#
# Predict: Which of the four runs learns to write periods, and which does not?
#
# Answer: The three per-prompt baselines learn. With one group, the
# advantage of a text is mostly *which prompt it had*: the samples after `"H"` all look good, the
# ones after `"A"` all bad, whatever they wrote, and the period count is a small ripple on top.
# That run barely moves.

# %%
LETTERS = "ABCDEFGH"


def generous_judge(samples: list[str]) -> Float[Tensor, " batch"]:
    """Periods in the text, plus 4 points per letter of the prompt after "A"."""
    return torch.tensor([s.count(".") + 4.0 * LETTERS.index(s[0]) for s in samples])


class MyCriticFreeTrainer(RLHFTrainer):
    """The trainer with your advantages and your k3 penalty."""

    def compute_advantages(self, batch):
        rewards = normalize_reward(batch.rewards)  # the trainer's default: one batch-wide scale
        if self.args.advantage_estimator == "rloo":
            advantages = compute_rloo_advantages(rewards, self.args.group_size)
        else:
            advantages = compute_group_advantages(
                rewards, self.args.group_size, self.args.advantage_estimator == "grpo")
        return advantages[:, None].expand_as(batch.outputs.logprobs)  # every token of a text

    def compute_rlhf_objective(self, mb):
        """GRPO's objective: the clipped surrogate minus kl_coef times the mean of your k3."""
        logits, _ = self.model.forward_generated(mb.sample_ids, mb.attention_mask,
                                                 mb.prefix_len, mb.kept)
        gen_tokens = mb.sample_ids[:, mb.prefix_len :]
        logprobs = get_gen_logprobs(logits, gen_tokens)
        ref_logprobs = get_gen_logprobs(self.reference.get_logits(mb.kept), gen_tokens)
        surrogate = calc_clipped_surrogate_objective(logprobs, mb.logprobs, mb.advantages,
                                                     self.args.clip_coef)
        kl_penalty = self.kl_controller.value * calc_kl_k3(logprobs, ref_logprobs).mean()
        return surrogate - kl_penalty, {"losses/clipped_surrogate": surrogate.item(),
                                        "losses/kl_penalty": kl_penalty.item()}


def train(advantage_estimator: str, group_size: int = 4, kl_coef: float = 0.02) -> list[dict]:
    """Train a fresh tiny model for 20 phases; return each phase's metrics, with the periods
    per sample under "periods"."""
    args = RLHFArgs(total_phases=20, batch_size=32, num_minibatches=4, gen_len=16,
                    prepend_bos=False, base_lr=3e-3, warmup_steps=0, kl_coef=kl_coef,
                    kl_estimator="k3", advantage_estimator=advantage_estimator,
                    group_size=group_size, seed=1)
    prompts = [letter for letter in LETTERS for _ in range(4)]  # each prompt in 4 adjacent rows
    trainer = MyCriticFreeTrainer(args, generous_judge, base_model=exercises.load_char_model(),
                                  prompts=prompts, console=Console(quiet=True), table_every=0)
    trainer.train(on_phase_end=lambda trainer, rollout: rollout.metrics.update(  # = history[-1]
        periods=sum(s.count(".") for s in rollout.texts) / len(rollout.texts)))
    return trainer.history


runs = {"GRPO (yours)": train("grpo"), "Dr. GRPO (yours)": train("dr_grpo"),
        "RLOO (yours)": train("rloo"), "GRPO, one group for the batch": train("grpo", 32)}
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, history in runs.items():
    ax.plot([m["periods"] for m in history], "o-", ms=3, label=name)
ax.set(xlabel="phase", ylabel="periods per sample", title="What the judge's bonus hides")
ax.legend()
plt.show()
for name, history in runs.items():
    print(f"{name:>30}: {history[0]['periods']:.1f} periods per sample in the first phase, "
          f"{history[-1]['periods']:.1f} in the last")

# %% [markdown]
# What to notice:
#
# - **The baseline must come from the same prompt.** With one group for the whole batch, the
#   reward differences between prompts swamp the differences between texts. The per-prompt
#   baselines remove exactly that: a prompt that is easy for everyone stops looking like a good
#   action. PPO's value head does the same job (it sees the prompt), but has to learn it first.
# - **GRPO, Dr. GRPO and RLOO** differ only in the scale of each group's advantages. All three
#   learn here; which is fastest changes from one seed to the next (try `seed=2` in `train`).
#   They part ways where groups differ in spread: GRPO's std gives a prompt whose samples barely
#   differ a full-size push.
# - **The cost**: 4 samples for every prompt, and a group whose 4 samples score the same teaches
#   nothing (the trainer logs that share as `charts/frac_reward_zero_std`).
#
# ## Does your $k_3$ hold the policy?
#
# A KL penalty is only as good as its gradient, and the runs above used `kl_coef=0.02`, too weak
# to show whether your $k_3$ pulls at all. Two more runs of your GRPO: your $k_3$ at `kl_coef=1`,
# and no penalty.
#
# What to expect: with your $k_3$ at `kl_coef=1` the KL stays below about 0.2; without a
# penalty it climbs past 2 in 20 phases. If the penalised run's KL climbs as well (a $k_3$
# whose ratio is detached ends near 6), your $k_3$ has the right values and the wrong gradient:
# run its check again, which compares gradients too.

# %%
kl_runs = {"your k3, kl_coef=1": train("grpo", kl_coef=1.0),
           "no penalty, kl_coef=0": train("grpo", kl_coef=0.0)}
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, history in kl_runs.items():
    ax.plot([m["charts/kl"] for m in history], "o-", ms=3, label=name)
ax.set(xlabel="phase", ylabel="KL(policy || reference)", title="Does the penalty pull?")
ax.legend()
plt.show()
for name, history in kl_runs.items():
    print(f"{name}: KL {history[-1]['charts/kl']:.2f} in the last phase")

# %% [markdown]
# The command line runs the library's versions: `minirlhf train --advantage-estimator grpo
# --group-size 4 --kl-estimator k3 ...`; `docs/critic_free.md` has REINFORCE++ (no groups at
# all: a batch-wide baseline on returns-to-go with the KL in the reward), the adaptive KL
# coefficient and the prompt datasets.
