# %% [markdown]
# # 1. The model, the value head and sampling
#
# RLHF's reinforcement-learning step (PPO for language models) juggles four models:
#
# | model | what it does | in minirlhf |
# | --- | --- | --- |
# | **policy** $\pi_\theta$ | writes the text; the one we train | a `HookedTransformer` |
# | **value model** $V_\phi$ | predicts the reward of a half-written text | a head on the policy |
# | **reward model** $r$ | scores finished texts | a Python function |
# | **reference model** $\pi_\text{ref}$ | the policy as it was at the start | a frozen copy |
#
# In this notebook you build the first two pieces of the pipeline: the policy with a value head
# (so one forward pass gives both), and a sampler that writes the texts (the *rollouts*). Each
# exercise ends with a check from `minirlhf.exercises`: it runs your code on seeded inputs and
# compares it with minirlhf's own solution and an independent oracle. If something is off it
# tells you what differed and, often, the mistake you most likely made.
#
# Everything here runs on tiny random models on a CPU in seconds; nothing downloads.
#
# **What you will learn**
#
# - how a value head shares the policy's trunk, and why it reads the residual stream after the
#   final layernorm;
# - how TransformerLens hooks read an activation without changing it;
# - how temperature and top-k reshape the next-token distribution a rollout samples from.
#
# **Reading**
#
# - Ziegler et al. 2019, *Fine-Tuning Language Models from Human Preferences*
#   (arXiv:1909.08593), section 2: the policy, the reference and the value function.
# - Holtzman et al. 2020, *The Curious Case of Neural Text Degeneration* (arXiv:1904.09751):
#   temperature, top-k and top-p sampling.
# - TransformerLens's *Main Demo* notebook, on hook points and `run_with_hooks`.
# - The ARENA RLHF exercises, on the value head; and this repository's `docs/models.md` and
#   `docs/sampling.md`.
#
# **How the help works.** Each exercise is labelled with its difficulty and importance (out of 5)
# and the time to allow. Under its description are hints: open them one at a time, and only when
# stuck. The full solution follows the check, collapsed. When a check fails it shows your own
# traceback first, then what differed, the mistake you most likely made, and the inputs of the
# failing case; `exercises.last_failure().rerun(your_function)` runs that case again, so you can
# add prints and debug it by hand.
#
# **Shapes in the signatures.** Every tensor argument is annotated with its shape, as in the
# library: `Int[Tensor, "batch seq"]` is a tensor of token ids with a batch axis and a sequence
# axis, `Float[Tensor, " batch"]` one float per sample, `Float[Tensor, ""]` a scalar (jaxtyping's
# notation; the dimension names are listed in the docs' glossary). Here they document; nothing
# checks them at run time.

# %%
import matplotlib.pyplot as plt
import torch
from jaxtyping import Float, Int
from rich import print as rprint
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from minirlhf import exercises
from minirlhf.runtime.loading import load_tiny_model
from minirlhf.tracking import make_sample_table

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models run faster on one thread than on many

# %% [markdown]
# `load_tiny_model` builds a random GPT-2-shaped `HookedTransformer` with GPT-2's real tokenizer
# (50,257 tokens). Its text is gibberish, but it is real text: rewards that read strings work on it.

# %%
base_model = load_tiny_model(n_layers=2, d_model=64, n_heads=4)
tokens = base_model.to_tokens("This is")
print(tokens, base_model.to_str_tokens("This is"))

# %% [markdown]
# ## Exercise 1: the value head
#
# PPO needs a baseline: how much reward the model *expects* from a state $s_t$ (the text so far).
# A value head is a small MLP that reads the residual stream at each position and outputs one
# number, $V(s_t)$. It shares the transformer's trunk with the policy:
#
# $$V(s_t) = \mathrm{MLP}\big(\mathrm{LN}_\text{final}(x_t)\big), \qquad
#   \text{logits}_t = W_U\,\mathrm{LN}_\text{final}(x_t) + b_U$$
#
# We read the residual stream right after the final layernorm, at the hook point
# `ln_final.hook_normalized`: the same vector the unembedding reads. A hook function receives the
# activation and may return a replacement; ours must only *store* the values and return nothing,
# so the logits are untouched. Use `self.base_model.run_with_hooks(tokens, fwd_hooks=[(name,
# fn)])` and a `nonlocal` variable to get the values out of the hook.
#
# The head: `Linear(d_model, 4 * d_model)`, `ReLU`, `Linear(4 * d_model, 1)`.
#
# Labels: difficulty 2, importance 4, 20 minutes
#
# Hint: In `__init__`, build the head from `base_model.cfg.d_model` and store it as
# `self.value_head` (after `super().__init__()`, so PyTorch registers its parameters).
#
# Hint: In `forward`, set `values = None`, then define `store(normalized, hook)` whose first line
# is `nonlocal values`; it sets `values = self.value_head(normalized).squeeze(-1)` and returns
# nothing. Pass `fwd_hooks=[("ln_final.hook_normalized", store)]` to `run_with_hooks`, which
# returns the logits.


# %%
class TransformerWithValueHead(nn.Module):
    """A HookedTransformer policy plus a value head computed in a hook after the final layernorm.

    Args:
        base_model: any HookedTransformer.
    """

    def __init__(self, base_model: HookedTransformer):
        super().__init__()
        self.base_model = base_model
        # BEGIN SOLUTION
        d_model = base_model.cfg.d_model
        self.value_head = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.ReLU(),
            nn.Linear(4 * d_model, 1),
        )
        # END SOLUTION

    def forward(
        self, tokens: Int[Tensor, "batch seq"]
    ) -> tuple[Float[Tensor, "batch seq d_vocab"], Float[Tensor, "batch seq"]]:
        """Returns (logits of shape (batch, seq, d_vocab), values of shape (batch, seq))."""
        # BEGIN SOLUTION
        values = None

        def store_values(normalized: torch.Tensor, hook: HookPoint):
            nonlocal values
            values = self.value_head(normalized).squeeze(-1)

        logits = self.base_model.run_with_hooks(
            tokens, return_type="logits", fwd_hooks=[("ln_final.hook_normalized", store_values)]
        )
        return logits, values
        # END SOLUTION


# %%
exercises.check_value_head(TransformerWithValueHead)

# %%
model = TransformerWithValueHead(base_model)
logits, values = model(tokens)
print(f"logits {tuple(logits.shape)}, values {tuple(values.shape)}")

# %% [markdown]
# ## Exercise 2: sampling
#
# A rollout is a batch of continuations of one prompt. At each step the model's logits $z$ at the
# last position give the next-token distribution, which we reshape before drawing from it:
#
# - **temperature** $T$: sample from $\mathrm{softmax}(z / T)$. $T < 1$ sharpens the distribution
#   (more likely tokens get even likelier), $T > 1$ flattens it.
# - **top-k**: keep only the $k$ most likely tokens (set the others' logits to $-\infty$).
#
# Write the loop by hand: tokenize the prompt (respecting `prepend_bos`), repeat it `batch_size`
# times, then `gen_len` times run the model, take the last position's logits, apply temperature
# and top-k, and draw one token per row with `torch.multinomial`. Return the token ids (prompt
# included) and their decoded texts (`model.to_string`).
#
# *(minirlhf's own `get_samples` does the same with a key-value cache, so each step only runs the
# new token through the model, and also supports top-p and several prompts.)*
#
# Labels: difficulty 2, importance 3, 20 minutes
#
# Hint: `model.to_tokens(prompt, prepend_bos=prepend_bos)` has shape `(1, prompt_len)`;
# `.repeat(batch_size, 1)` makes the batch. Inside the loop, `model(tokens)[:, -1]` is the
# `(batch, d_vocab)` logits of the next token.
#
# Hint: For top-k, the k-th largest logit of each row is `logits.topk(top_k, dim=-1).values[:,
# -1:]`; `masked_fill` the smaller ones with `-inf`. `torch.multinomial(probs, num_samples=1)`
# returns a `(batch, 1)` column to `torch.cat` onto the tokens along `dim=1`.


# %%
@torch.no_grad()
def get_samples(
    model: HookedTransformer,
    prompt: str,
    batch_size: int,
    gen_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    prepend_bos: bool = True,
) -> tuple[Int[Tensor, "batch seq"], list[str]]:
    """Sample `gen_len` tokens after `prompt`, `batch_size` times.

    Returns:
        sample_ids: (batch_size, prompt tokens + gen_len), the prompt's tokens first.
        samples: the decoded text of each row.
    """
    # BEGIN SOLUTION
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos).repeat(batch_size, 1)
    for _ in range(gen_len):
        logits = model(tokens)[:, -1] / temperature
        if top_k is not None:
            kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        next_tokens = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
        tokens = torch.cat([tokens, next_tokens], dim=1)
    return tokens, model.to_string(tokens)
    # END SOLUTION


# %%
exercises.check_get_samples(get_samples)

# %% [markdown]
# Random weights write random tokens, but they decode to text, so a reward function can read
# them:

# %%
sample_ids, samples = get_samples(base_model, "This is", batch_size=4, gen_len=12, top_k=50)
rprint(make_sample_table(samples, [0.0] * len(samples), title="A random model's samples"))

# %% [markdown]
# ### How temperature reshapes the distribution
#
# To see the effect, take a model whose vocabulary is GPT-2's 94 printable one-character tokens
# (`exercises.load_char_model`, also used in notebook 4) and plot its next-token distribution after
# the prompt "Q:" at three temperatures.
#
# Predict: At $T = 2$, does the likeliest character's probability go up or down? What
# distribution does sampling approach as $T \to \infty$, and as $T \to 0$?
#
# Answer: Down: dividing the logits by $T > 1$ shrinks the gaps between them, so the
# distribution flattens. As $T \to \infty$ it becomes uniform over the vocabulary; as
# $T \to 0$ all the probability goes to the likeliest token (greedy decoding).

# %%
char_model = exercises.load_char_model(seed=3)
with torch.no_grad():
    next_logits = char_model(char_model.to_tokens("Q:", prepend_bos=False))[0, -1] * 2
order = next_logits.argsort(descending=True)[:15]
labels = [char_model.tokenizer.decode([i]) for i in order.tolist()]
fig, ax = plt.subplots(figsize=(8, 3))
for offset, temperature in zip([-0.27, 0, 0.27], [0.5, 1.0, 2.0], strict=True):
    probs = (next_logits / temperature).softmax(-1)[order]
    ax.bar(torch.arange(15) + offset, probs, width=0.27, label=f"T = {temperature}")
ax.set_xticks(range(15), labels)
ax.set_ylabel("probability")
ax.set_title("The 15 likeliest next characters at three temperatures")
ax.legend()
plt.show()

# %% [markdown]
# Next, notebook 2 (`02_rewards_and_advantages`) scores these samples and turns the scores into
# per-token advantages.
