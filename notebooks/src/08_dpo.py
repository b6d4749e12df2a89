# %% [markdown]
# # 8. DPO: preferences without a reward model
#
# Notebook 6 learnt a reward model from preference pairs and then ran PPO against it: two
# trainings, a sampler in the loop, a value head. **Direct Preference Optimisation** (Rafailov
# et al. 2023) does the same job with one loss on the pairs themselves. The KL-regularised
# objective PPO maximises, $\mathbb{E}[r(x, y)] - \beta\,\mathrm{KL}(\pi \,\|\, \pi_\text{ref})$,
# has a closed-form optimum, $\pi^*(y \mid x) \propto \pi_\text{ref}(y \mid x)\, e^{r(x, y)/\beta}$.
# Turned around, every policy defines an **implicit reward**
#
# $$r(x, y) = \beta \log\frac{\pi(y \mid x)}{\pi_\text{ref}(y \mid x)} + \beta \log Z(x),$$
#
# and putting it into the Bradley-Terry loss of notebook 6 makes $Z(x)$ cancel (both answers
# share the prompt). What is left is a loss on the policy's log-probs:
#
# $$\mathcal{L}_\text{DPO} = -\log\sigma\big(\beta\, h\big), \qquad
#   h = \log\frac{\pi(y_w \mid x)}{\pi_\text{ref}(y_w \mid x)}
#     - \log\frac{\pi(y_l \mid x)}{\pi_\text{ref}(y_l \mid x)}$$
#
# with $y_w$ the chosen (winning) answer and $y_l$ the rejected one. No reward model, no
# sampling during training, no value head, no advantages. What it pays: it learns only from the
# texts in the pairs (PPO's policy explores and is scored on its own new samples), so it is only
# as good as the pairs, and it can drive the probabilities of the chosen answers *down* too, as
# long as the rejected ones fall faster.
#
# You write the two pieces: the log-probability of a whole answer, $\log\pi(y \mid x)$, from a
# padded batch, and the loss (DPO's, and IPO's variant). Then `train_dpo` trains a tiny model with
# your loss.
#
# **What you will learn**
#
# - how a sequence's log-prob is read from a padded batch: which positions count, and which
#   logits score which token;
# - where $\beta$ and the reference sit in the DPO loss, and what IPO changes;
# - what the implicit rewards do during training, and what DPO does to what the model samples.
#
# **Reading**
#
# - Rafailov et al. 2023, *Direct Preference Optimization: Your Language Model is Secretly a
#   Reward Model* (arXiv:2305.18290), sections 4 and 5.
# - Azar et al. 2023, *A General Theoretical Paradigm to Understand Learning from Human
#   Preferences* (arXiv:2310.12036): IPO.
# - This repository's `docs/dpo.md`.
#
# As before: labels, hints one at a time, the solution collapsed after each check.

# %%
import functools
import random

import matplotlib.pyplot as plt
import torch
from jaxtyping import Float, Int
from rich.console import Console
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf import DPOArgs, exercises, get_samples, train_dpo
from minirlhf import get_sequence_logprobs as library_sequence_logprobs
from minirlhf.models import run_model
from minirlhf.pairs.dpo_training import tokenize_responses
from minirlhf.pairs.preferences import Preference, split_preferences
from minirlhf.runtime.loading import PRINTABLE_VOCAB, load_tiny_model

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models gain nothing from more threads

# %% [markdown]
# ## Exercise 1: the log-prob of an answer
#
# A pair's texts are tokenized as `[prompt tokens] [answer tokens] [padding]` (right padding;
# left padding puts the padding first), and a forward pass gives `logits` of shape
# `(batch, seq, d_vocab)`. Two masks say which positions matter:
#
# ```text
# tokens          A    x    .    y    !    PAD  PAD
# attention_mask  1    1    1    1    1    0    0      real tokens
# response_mask   0    1    1    1    1    1    1      from the answer's first token on
# counted         -    x    .    y    !    -    -      both masks 1
# ```
#
# $\log\pi(y \mid x)$ is the **sum** of the log-probs of the answer's tokens, each under the
# logits that predicted it: the logits at position $s$ predict the token at $s + 1$, so the token
# at $s$ is scored by `logits[:, s - 1]` (token 0 has nothing before it, and is never part of an
# answer). A token counts where both masks are 1: the response mask may run on over the padding,
# and only the attention mask says what is real.
#
# One more trap: the logits at padding positions are not guaranteed to be finite (a left-padded
# row's pads attend to nothing, which can give NaN). Multiplying them by a 0 in the mask keeps
# the NaN ($\text{NaN} \times 0 = \text{NaN}$); select with `torch.where` instead.
#
# Labels: difficulty 3, importance 4, 20 minutes
#
# Hint: `logprobs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]` has
# one column per token 1 .. seq-1. The mask that goes with it is
# `(attention_mask * response_mask)[:, 1:]`.
#
# Hint: `torch.where(counted.bool(), logprobs, 0.0).sum(dim=-1)`.


# %%
def get_sequence_logprobs(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"],
    response_mask: Int[Tensor, "batch seq"],
) -> Float[Tensor, " batch"]:
    """Sum of the log-probs of the tokens where both masks are 1, each scored by the logits one
    position before it."""
    # BEGIN SOLUTION
    logprobs = logits[:, :-1].log_softmax(dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    counted = (attention_mask * response_mask)[:, 1:].bool()
    return torch.where(counted, logprobs, 0.0).sum(dim=-1)
    # END SOLUTION


# %%
exercises.check_get_sequence_logprobs(get_sequence_logprobs)

# %% [markdown]
# ## Exercise 2: the DPO loss, and IPO's
#
# From the four summed log-probs of each pair (the policy's and the frozen reference's, for the
# chosen and the rejected answer) compute $h$ as above, then the mean over the pairs of
#
# - DPO (`loss_type="sigmoid"`): $-\log\sigma(\beta h)$;
# - IPO (`loss_type="ipo"`, Azar et al. 2023): $\big(h - \frac{1}{2\beta}\big)^2$. DPO's loss
#   keeps falling as $h$ grows, so on pairs that are always decided the same way it pushes the
#   two answers apart without end (the KL to the reference stops mattering); IPO's square asks
#   for a fixed gap, $h = 1/(2\beta)$, and no more.
#
# $\beta$ is the strength of the KL regularisation: small $\beta$, weak pull to the reference.
# Keep the loss finite when $\beta h$ is far below 0 (`F.logsigmoid`, as in notebook 6).
#
# Labels: difficulty 2, importance 5, 15 minutes
#
# Hint: `h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps -
# ref_rejected_logps)`.
#
# Hint: `-torch.nn.functional.logsigmoid(beta * h).mean()`, or for IPO
# `((h - 1 / (2 * beta)) ** 2).mean()`.
#
# Predict: At the first step the policy *is* the reference. What is the DPO loss there, for any
# pairs and any $\beta$?
#
# Answer: $\log 2 \approx 0.693$: every log-ratio is 0, so $h = 0$ and $\sigma(0) = 1/2$. (IPO's
# is $1/(4\beta^2)$.) The implicit rewards $\beta \log(\pi/\pi_\text{ref})$ all start at 0.


# %%
def calc_dpo_loss(
    policy_chosen_logps: Float[Tensor, " batch"],
    policy_rejected_logps: Float[Tensor, " batch"],
    ref_chosen_logps: Float[Tensor, " batch"],
    ref_rejected_logps: Float[Tensor, " batch"],
    beta: float,
    loss_type: str = "sigmoid",
) -> Float[Tensor, ""]:
    """Mean over the pairs of -log sigmoid(beta h) ("sigmoid") or (h - 1 / (2 beta))^2 ("ipo")."""
    # BEGIN SOLUTION
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    return -torch.nn.functional.logsigmoid(beta * h).mean()
    # END SOLUTION


# %%
exercises.check_calc_dpo_loss(calc_dpo_loss)

# %% [markdown]
# ## The pairs: periods over exclamation marks
#
# The policy is the tiny 94-character model of notebooks 4 and 6. The answers alternate a
# letter and a punctuation mark (`"x.q!b."`): GPT-2's tokenizer then keeps every character a
# token of its own (it would merge a run of letters into a token outside the 94). The judge
# prefers the answer with more periods; ties are dropped. A quarter of the pairs is held out.

# %%
rng = random.Random(0)


def random_answer() -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") + rng.choice(".!")
                   for _ in range(rng.randint(3, 5)))


pairs = []
while len(pairs) < 128:
    first, second = random_answer(), random_answer()
    if first.count(".") != second.count("."):  # a tie says nothing
        chosen, rejected = sorted([first, second], key=lambda a: a.count("."), reverse=True)
        pairs.append(Preference(rng.choice("ABCD"), chosen, rejected))
train, heldout = split_preferences(pairs, heldout_fraction=0.25, seed=0)
print(f"{len(train)} pairs to train on, {len(heldout)} held out; for example:")
for p in train[:3]:
    print(f"  after {p.prompt!r}: chosen {p.chosen!r}, rejected {p.rejected!r}")

# %% [markdown]
# Your `get_sequence_logprobs` on a real batch: the chosen answers of four pairs (of different
# lengths, so the batch is right-padded), through the untrained policy, next to the library's
# function that `train_dpo` uses.

# %%
def load_policy() -> HookedTransformer:
    return load_tiny_model(n_layers=1, d_model=32, n_heads=2, n_ctx=64, seed=0,
                           d_vocab=PRINTABLE_VOCAB)


policy = load_policy()
batch = tokenize_responses(policy, [p.prompt for p in train[:4]], [p.chosen for p in train[:4]],
                           prepend_bos=False)
with torch.no_grad():
    logits, _ = run_model(policy, batch.tokens, batch.attention_mask, fast_path=False)
print("attention mask rows:", batch.attention_mask.sum(-1).tolist(), "real tokens")
print("yours:    ", get_sequence_logprobs(logits, batch.tokens, batch.attention_mask,
                                          batch.response_mask).numpy().round(3))
print("library's:", library_sequence_logprobs(logits, batch.tokens, batch.attention_mask,
                                              batch.response_mask).numpy().round(3))

# %% [markdown]
# ## Training with your loss
#
# `train_dpo` asks the frozen reference (a copy of the starting policy) once for the log-probs of
# every answer, then takes AdamW steps on minibatches of pairs: one forward pass over the chosen
# and rejected answers, the library's `get_sequence_logprobs`, and **your** `calc_dpo_loss`
# (`loss_fn=`). It logs the held-out pairs' implicit rewards $\beta\log(\pi/\pi_\text{ref})$ of
# the chosen and rejected answers, their mean gap (the **margin**) and the accuracy (the share of
# pairs whose chosen answer has the larger implicit reward). Two runs, $\beta = 0.1$: your DPO
# loss and your IPO loss, about a second each.
#
# Predict: Where will each run's held-out margin $\beta h$ go?
#
# Answer: DPO's keeps rising: its loss is smallest at $h = \infty$. IPO's levels off near
# $\beta \cdot \frac{1}{2\beta} = 0.5$, the gap its square asks for.

# %%
def train_with(loss_type: str) -> tuple[list[dict], HookedTransformer]:
    """A fresh policy trained on the pairs with your loss; the history and the policy."""
    policy = load_policy()
    args = DPOArgs(beta=0.1, loss_type=loss_type, lr=3e-3, epochs=4, batch_size=16,
                   eval_every=4, prepend_bos=False)
    history = train_dpo(policy, train, heldout, args, console=Console(quiet=True),
                        loss_fn=functools.partial(calc_dpo_loss, loss_type=loss_type))
    return history, policy


runs = {"DPO (yours)": train_with("sigmoid"), "IPO (yours)": train_with("ipo")}
fig, (ax_margin, ax_rewards) = plt.subplots(1, 2, figsize=(11, 3.5))
for color, (name, (history, _)) in zip(["tab:blue", "tab:orange"], runs.items()):
    evals = [m for m in history if "heldout/margin" in m]
    steps = [m["charts/step"] for m in evals]
    ax_margin.plot(steps, [m["heldout/margin"] for m in evals], "o-", color=color, label=name)
    for key, style in [("chosen_reward", "o-"), ("rejected_reward", "s--")]:
        ax_rewards.plot(steps, [m[f"heldout/{key}"] for m in evals], style, color=color,
                        label=f"{name}: {key.split('_')[0]}")
ax_margin.axhline(0.5, color="gray", linestyle=":", label="IPO's target, 1/2")
ax_margin.set(xlabel="step", title="held-out margin (beta h)")
ax_rewards.set(xlabel="step", title="held-out implicit rewards")
ax_margin.legend()
ax_rewards.legend(fontsize=7)
fig.tight_layout()
plt.show()
for name, (history, _) in runs.items():
    print(f"{name}: held-out accuracy {history[-1]['heldout/accuracy']:.2f}, "
          f"margin {history[-1]['heldout/margin']:+.2f}")

# %% [markdown]
# The pairs only ever showed answers; did the policy learn to *write* periods? Sample 256 texts
# of 12 characters from each (the same seed) and count:

# %%
def punctuation_rates(model: HookedTransformer) -> str:
    texts = get_samples(model, "A", batch_size=256, gen_len=12, prepend_bos=False,
                        seed=123).texts
    written = [text[1:] for text in texts]  # without the prompt
    total = sum(len(text) for text in written)
    return (f"'.' {sum(t.count('.') for t in written) / total:.3f}, "
            f"'!' {sum(t.count('!') for t in written) / total:.3f} of the characters")


print(f"{'before':>12}: {punctuation_rates(load_policy())}")
for name, (_, policy) in runs.items():
    print(f"{name:>12}: {punctuation_rates(policy)}")

# %% [markdown]
# What to notice:
#
# - **The implicit rewards**: only their gap enters the loss, not where each one goes. The
#   rejected answers have periods too (just fewer), so a policy that likes periods can raise
#   their log-probs as well: in the IPO run both implicit rewards end above 0. On real data the
#   chosen answers' log-probs often *fall* during DPO, the rejected answers' falling faster.
# - **DPO vs IPO**: DPO's margin keeps growing as long as you train (on a real data set, that is
#   over-fitting the pairs, held in check only by early stopping); IPO's stops near its target.
# - **The samples**: the untrained model writes a '.' about once in 200 characters. After DPO
#   the share of '.' is many times higher, although DPO never sampled anything: everything it
#   learnt came from the answers in the pairs. IPO, which stops at its target gap, moves it far
#   less.
#
# The command line runs the same training on SmolLM2 with the pairs of notebook 6:
# `minirlhf dpo --data prefs.jsonl --base-model smollm2 --out runs/dpo` (`--loss-type ipo`,
# `--label-smoothing` for conservative DPO); `docs/dpo.md` has the results.
