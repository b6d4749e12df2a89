# %% [markdown]
# # 9. LoRA: train a few low-rank matrices, keep the base model as the reference
#
# PPO as notebooks 1 to 4 built it trains every weight of the policy and keeps a second, frozen
# copy of the whole model as the reference for the KL penalty. **LoRA** (low-rank adaptation, Hu
# et al. 2021) freezes every weight $W$ and learns a correction of low rank beside the matrices
# it chooses:
#
# $$h = W x + \frac{\alpha}{r}\, B A\, x, \qquad A \in \mathbb{R}^{r \times d_\text{in}},\
#   B \in \mathbb{R}^{d_\text{out} \times r},\ r \ll d_\text{in}, d_\text{out}.$$
#
# Why it suits RLHF:
#
# - **No reference copy.** The base weights never change, so the reference model *is* the
#   policy with its adapters switched off: one set of weights serves both.
# - **Fewer optimiser states.** AdamW keeps two numbers (its moment estimates) and a gradient for
#   every weight it trains; with LoRA that is $r(d_\text{in} + d_\text{out})$ numbers per matrix
#   instead of $d_\text{in} d_\text{out}$.
# - **The same forward cost.** The adapters add two thin matrix products per adapted matrix
#   (and can be merged into $W$ for sampling or export): the forward and backward passes through
#   the model, and the activations they keep, stay what they were.
#
# A **frozen trunk** (`RLHFArgs.trainable_layers`) saves in another way: the bottom blocks do
# not train at all, so their output is computed once per phase and reused by every learning
# step, and the reference shares them. The two combine: LoRA adapters in the top blocks only.
#
# You write the adapter, attach it to one matrix of a TransformerLens model with hooks, and
# compute the reference with the adapters off; then PPO trains a LoRA policy with the library's
# `lora_rank`.
#
# **What you will learn**
#
# - why B starts at zero and what the scale $\alpha / r$ is for;
# - how a hook pair adds a low-rank term to one matrix of a `HookedTransformer` (read its input
#   at one hook point, add to its output at the next), and what "permanent" means for a hook;
# - what trains (only A and B) and why the reference needs no copy of the weights;
# - what LoRA saves in parameters and optimiser memory, on a tiny model and on SmolLM2.
#
# **Reading**
#
# - Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models* (arXiv:2106.09685),
#   section 4.1: the method, its initialisation and the scale $\alpha / r$.
# - Dettmers et al. 2023, *QLoRA* (arXiv:2305.14314): adapters on every linear map of a block.
# - This repository's `minirlhf/runtime/lora.py` (its module docstring) and `RLHFArgs`' "what
#   trains" fields.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from minirlhf import RLHFArgs, RLHFTrainer, exercises
from minirlhf.models import prepare_policy
from minirlhf.rewards import reward_fn_char_count
from minirlhf.runtime.lora import adapters_off, merge_lora

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models gain nothing from more threads

# %% [markdown]
# ## What LoRA saves on SmolLM2-135M
#
# SmolLM2-135M has 30 blocks of width $d_\text{model} = 576$: attention with 9 query heads and 3
# key/value heads of 64 dimensions, and a gated MLP of width 1,536. An adapter of rank $r$ on a
# matrix from $d_\text{in}$ to $d_\text{out}$ has $r(d_\text{in} + d_\text{out})$ parameters.
#
# Predict: With rank 8 on all seven matrices of every block (q, k, v, o, and the MLP's in, gate
# and out), what share of SmolLM2's 135 million parameters trains: about 20 %, 2 % or 0.2 %?
#
# Answer: About 2 %: 2.4 million. The cell below counts them, and the memory AdamW needs.

# %%
d_model, d_mlp, d_kv, n_layers, rank = 576, 1536, 3 * 64, 30, 8
shapes = {"q": (d_model, d_model), "k": (d_model, d_kv), "v": (d_model, d_kv),
          "o": (d_model, d_model), "in": (d_model, d_mlp), "gate": (d_model, d_mlp),
          "out": (d_mlp, d_model)}  # (d_in, d_out) of each matrix
lora_params = n_layers * sum(rank * (d_in + d_out) for d_in, d_out in shapes.values())
all_params = 134.5e6
print(f"LoRA parameters: {lora_params:,} ({lora_params / all_params:.1%} of the model)")
# float32: 4 bytes a weight; training one adds a gradient (4) and AdamW's two moments (8).
full = all_params * (4 + 4 + 8) + all_params * 4  # the policy trains, plus the reference copy
with_lora = all_params * 4 + lora_params * (4 + 4 + 8)  # one frozen copy serves both
print(f"weights, gradients and AdamW states: {full / 2**30:.2f} GiB full fine-tuning, "
      f"{with_lora / 2**30:.2f} GiB with LoRA")

# %% [markdown]
# ## Exercise 1: the adapter
#
# Write `Lora`, one adapter of one matrix:
#
# - `A`, shape `(rank, d_in)`, random (use `nn.init.kaiming_uniform_(self.A, a=5**0.5)`, what
#   `nn.Linear` does), and `B`, shape `(d_out, rank)`, **zero**; both `nn.Parameter`s;
# - `forward(x)` returns only the low-rank term $\frac{\alpha}{r} B A x$ (the model adds it to
#   $W x$), for `x` with any leading axes;
# - `delta()` returns the change to the weight, $\frac{\alpha}{r} B A$, in `F.linear`'s
#   `(out, in)` layout, the layout of $W$: $(W + \text{delta}) x = W x + \text{forward}(x)$.
#
# With $B = 0$ a fresh adapter adds nothing, so training starts from exactly the base model (and
# the first KL is 0). Why not both zero? The gradient of $B$ is proportional to $A x$ and that of
# $A$ to $B$: with both zero, neither ever moves. And why $\alpha / r$? A rank-$r$ term sums $r$
# products, so dividing by $r$ keeps the size of the first updates the same when you change the
# rank, and $\alpha$ need not be retuned.
#
# Labels: difficulty 2, importance 5, 15 minutes
#
# Hint: `F.linear(x, M)` computes `x @ M.T`: `F.linear(x, self.A)` has `rank` features, and
# `F.linear` of that with `self.B` has `d_out`.
#
# Hint: In `__init__`: `self.A = nn.Parameter(torch.empty(rank, d_in))`, then initialise it;
# `self.B = nn.Parameter(torch.zeros(d_out, rank))`; `self.scale = alpha / rank`. `forward`
# multiplies `F.linear(F.linear(x, self.A), self.B)` by `self.scale`.


# %%
class Lora(nn.Module):
    """One adapter: x -> (alpha / rank) * B(A(x)), the low-rank term added to a frozen W x."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        # BEGIN SOLUTION
        self.A = nn.Parameter(torch.empty(rank, d_in))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank
        # END SOLUTION

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        # BEGIN SOLUTION
        return F.linear(F.linear(x, self.A), self.B) * self.scale
        # END SOLUTION

    def delta(self) -> Float[Tensor, "d_out d_in"]:
        """The change to W (F.linear layout): (alpha / rank) * B @ A."""
        # BEGIN SOLUTION
        return self.scale * self.B @ self.A
        # END SOLUTION


# %%
exercises.check_lora(Lora)

# %% [markdown]
# ## Exercise 2: attach it to a model with hooks
#
# A `HookedTransformer`'s MLP writes $W_\text{out}\,\text{post} + b_\text{out}$ to
# `hook_mlp_out`, where `mlp.hook_post` holds the hidden activation "post" (after the
# nonlinearity), the input of $W_\text{out}$. To put an adapter on $W_\text{out}$ of block `layer`,
# without touching TransformerLens's code:
#
# 1. **freeze** every parameter of the model (`requires_grad_(False)`), *before* you make the
#    adapter, so that the adapter's A and B are the only parameters left to train;
# 2. make a `Lora(d_mlp, d_model, rank, alpha)` and **register** it on the model (an attribute:
#    `model.lora_out = adapter`), so that `model.parameters()`, which the optimiser is built
#    from, holds A and B, and `model.to(device)` moves them;
# 3. add two hooks: one on `blocks.{layer}.mlp.hook_post` that **stores** the hidden activation
#    (it returns nothing, so the activation is unchanged), and one on
#    `blocks.{layer}.hook_mlp_out` that **returns** the activation plus the adapter's term on the
#    stored input. A hook that returns a tensor replaces the activation.
#
# Add both with `model.add_hook(name, hook, is_permanent=True)`. Hooks that are not permanent
# are removed by `model.reset_hooks()`, which `run_with_hooks` and `run_with_cache` call when
# they finish: the adapter would silently drop out of the model after the first cached forward.
#
# Return the adapter.
#
# Labels: difficulty 3, importance 4, 20 minutes
#
# Hint: The stored input lives between the two hooks: a dict both can see (`inputs["post"] =
# post`), or a variable the storing hook declares `nonlocal`, as the value head did in
# notebook 1.
#
# Hint: The second hook is `def add_term(mlp_out, hook): return mlp_out + adapter(inputs["post"])`;
# the adapter's output already has the shape of `mlp_out`, (batch, seq, d_model).


# %%
def attach_lora(model: HookedTransformer, layer: int, rank: int, alpha: float) -> Lora:
    """Freeze the model, attach a LoRA adapter to block `layer`'s W_out through permanent hooks,
    and return the adapter."""
    # BEGIN SOLUTION
    for param in model.parameters():
        param.requires_grad_(False)
    adapter = Lora(model.cfg.d_mlp, model.cfg.d_model, rank, alpha)
    model.lora_out = adapter
    inputs = {}

    def store_input(post: Float[Tensor, "batch seq d_mlp"], hook: HookPoint) -> None:
        inputs["post"] = post

    def add_term(mlp_out: Float[Tensor, "batch seq d_model"], hook: HookPoint) -> Tensor:
        return mlp_out + adapter(inputs["post"])

    model.add_hook(f"blocks.{layer}.mlp.hook_post", store_input, is_permanent=True)
    model.add_hook(f"blocks.{layer}.hook_mlp_out", add_term, is_permanent=True)
    return adapter
    # END SOLUTION


# %%
exercises.check_attach_lora(attach_lora)

# %% [markdown]
# What trains now, on the tiny model of notebook 4 (one printable character per token):

# %%
model = exercises.load_char_model(n_layers=2, d_model=32, n_heads=2, seed=0)
tokens = torch.randint(0, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    before = model(tokens)
adapter = attach_lora(model, layer=1, rank=4, alpha=8.0)
trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
print(f"{sum(trainable.values())} of {sum(p.numel() for p in model.parameters()):,} parameters "
      f"train: {trainable}")
with torch.no_grad():
    print("a fresh adapter changes the logits by", (model(tokens) - before).abs().max().item())

# %% [markdown]
# ## Exercise 3: the reference is the base model
#
# The library's `add_lora(model, rank, alpha, targets)` does what you did for any of the seven
# matrices of every block, and its hooks read one switch: they add their terms only while
# `model.lora.enabled` is True. The PPO reference model is the policy with that switch off: the
# same weights, no copy.
#
# Write `get_ref_logits`: the reference's logits on `tokens`, computed with the adapters off
# (and without gradient, since the reference never trains). Whatever happens, turn the adapters
# back **on** before you return: the policy samples and trains with them. That includes a forward
# pass that raises (a bad batch, an interrupted cell), so use `try` / `finally`. (The library's
# `adapters_off(model)` is this switch as a context manager; write it by hand here.)
#
# Labels: difficulty 1, importance 4, 5 minutes
#
# Hint: `model.lora.enabled = False`, the forward pass inside `try:`, and
# `model.lora.enabled = True` (or the value it had) in `finally:`.

# %%
def get_ref_logits(
    model: HookedTransformer, tokens: Int[Tensor, "batch seq"]
) -> Float[Tensor, "batch seq d_vocab"]:
    """The reference model's logits: the LoRA policy with its adapters off."""
    # BEGIN SOLUTION
    adapters = model.lora
    was_enabled, adapters.enabled = adapters.enabled, False
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        adapters.enabled = was_enabled
    # END SOLUTION


# %%
exercises.check_get_ref_logits(get_ref_logits)

# %% [markdown]
# ## PPO with LoRA: count the periods again
#
# `RLHFArgs(lora_rank=...)` gives the trainer a LoRA policy: `add_lora` on every matrix of
# `lora_targets` (all seven by default; a GPT-2-shaped model has no gate), the base frozen, and a
# `ReferenceModel` that is the same model with its adapters off. Below, the "count the periods"
# task of notebook 4, once training every weight and once with rank-4 adapters. LoRA's learning
# rate is higher (1e-2 against 1e-3): its updates start from a zero B and move a few numbers.
#
# Predict: After 20 phases, how far are the LoRA run's reference logits from those of the
# untrained model (a fresh copy loaded from the same seed): about 0.1, about 1, or 0?
#
# Answer: Exactly 0. PPO changed only A and B; the base weights the reference runs on never
# moved. (Training every weight, the reference is a copy made at the start: also the untrained
# model, but it costs a second copy of the weights.)


# %%
def make_trainer(lora_rank: int, base_lr: float) -> RLHFTrainer:
    args = RLHFArgs(total_phases=20, batch_size=32, num_minibatches=4, gen_len=16, prefix="Q:",
                    prepend_bos=False, base_lr=base_lr, head_lr=1e-3, warmup_steps=0,
                    kl_coef=0.1, advantage_estimator="gae", gae_lambda=1.0, seed=1,
                    lora_rank=lora_rank, lora_alpha=8.0)
    model = exercises.load_char_model(n_layers=1, d_model=32, n_heads=2, seed=0)
    return RLHFTrainer(args, reward_fn_char_count, base_model=model, console=Console(quiet=True))


runs = {"every weight trains": make_trainer(lora_rank=0, base_lr=1e-3),
        "LoRA, rank 4": make_trainer(lora_rank=4, base_lr=1e-2)}
for name, trainer in runs.items():
    policy = trainer.model.base_model
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    print(f"{name}: {trained:,} of the transformer's {total:,} parameters train; the reference "
          f"is a copy: {trainer.reference.model is not policy}")
    trainer.train()

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
    states = sum(s.numel() for state in trainer.optimizer.state.values() for s in state.values()
                 if s.dim() > 0)
    rewards = [m["charts/reward_mean"] for m in trainer.history]
    print(f"{name}: mean reward {rewards[0]:.2f} -> {rewards[-1]:.2f}; AdamW holds {states:,} "
          "numbers of state (value head included)")

# %% [markdown]
# The reference after training, against the untrained model loaded again from the same seed;
# then `merge_lora` folds each adapter into its weight ($W \leftarrow W + \frac{\alpha}{r} BA$)
# and removes the hooks, for export or for sampling elsewhere, with the same logits:

# %%
lora_policy = runs["LoRA, rank 4"].model.base_model
untrained = exercises.load_char_model(n_layers=1, d_model=32, n_heads=2, seed=0)
gen = torch.Generator().manual_seed(1)
tokens = torch.randint(0, untrained.cfg.d_vocab, (4, 12), generator=gen)
with torch.no_grad():
    with adapters_off(lora_policy):
        reference = lora_policy(tokens)
    policy_logits = lora_policy(tokens)
    print("reference vs untrained model:", (reference - untrained(tokens)).abs().max().item())
    print("policy vs untrained model:   ", (policy_logits - untrained(tokens)).abs().max().item())
    merge_lora(lora_policy)
    print("merged vs policy:            ", (lora_policy(tokens) - policy_logits).abs().max().item())

# %% [markdown]
# ## What trains, three ways
#
# `prepare_policy` (what the trainer calls with `RLHFArgs`' `trainable_layers` and `lora_*`
# fields) on a 2-block model: every weight, the top block only (a frozen trunk, whose output is
# computed once per phase and shared with the reference), and LoRA adapters in the top block.

# %%
for setting in [dict(), dict(trainable_layers=1), dict(trainable_layers=1, lora_rank=4)]:
    model = exercises.load_char_model(n_layers=2, d_model=32, n_heads=2, seed=0)
    frozen_blocks = prepare_policy(model, **setting)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{str(setting):42} {trained:>6,} parameters train; frozen trunk: {frozen_blocks} "
          "blocks")

# %% [markdown]
# What to notice:
#
# - **Both runs learn the task**, LoRA with a few thousand numbers. On SmolLM2 the saving is the
#   one computed at the top: a reference that costs nothing and optimiser states for 2 % of the
#   weights.
# - **The reference stays the base model**, exactly, with no copy: turning the adapters off is
#   all it takes. That is also why the adapters must be turned back on.
# - **Merged, the adapters cost nothing at inference**: the model is a plain `HookedTransformer`
#   again.
#
# On the command line: `minirlhf train --lora-rank 8` (with `--lora-targets q,v` to adapt fewer
# matrices, `--trainable-layers 4` to keep the adapters in the top blocks).

# %% [markdown]
# ## Bonus: where to go from here
#
# The end of the sequence. None of these has a check.
#
# 1. **Noisy labels.** Flip a fifth of the training pairs (swap chosen and rejected) and train
#    again, then with `DPOArgs(label_smoothing=0.2)` (conservative DPO, which assumes that share
#    of labels is wrong; the library's loss, so leave `loss_fn` out). Which keeps the held-out
#    accuracy up?
# 2. **$\beta$.** Train with $\beta$ = 0.03, 0.1 and 0.5, and plot the KL from the reference of
#    what each samples (notebook 3's exact KL, on `get_samples`' texts). What does $\beta$ trade?
# 3. **Mean instead of sum.** Give the chosen answers more letters than the rejected ones and
#    train with a loss whose log-probs are averaged over the answer's tokens (the mistake the
#    first check names). What does a summed log-prob prefer about length, and what does the mean?
# 4. **DPO against PPO.** Train notebook 6's policy with DPO on notebook 6's preferences and
#    compare the judge's digit count with PPO's against the reward model.
# 5. **No groups at all.** REINFORCE++ (`advantage_estimator="reinforce_pp"`, `kl_in="reward"`)
#    puts the KL into the per-token reward and takes one baseline over the batch. Run it on
#    notebook 7's generous judge: does a batch-wide baseline fail here as it did there?
# 6. **LoRA on a real model.** Train SmolLM2 with `minirlhf train --lora-rank 8` and with
#    `--trainable-layers 4`, and compare the phase times and the peak memory with training every
#    weight (`benchmarks/trainable_weights.py` does it side by side).
