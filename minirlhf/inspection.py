"""What did RL change? A trained policy compared with its reference, from the inside.

Beside the pipeline, on the model layer: pure functions of two models (the trained policy and its
reference: plain HookedTransformers with the same weight names, LoRA merged) and some tokens.
`minirlhf inspect` runs them on a run folder and writes the report; notebook 11 has the learner
write four of them. Four questions, each with its paper:

1. Which weights moved (`get_weight_changes`): per matrix, the relative size of the change, the
   share of entries that moved, the share that survives bf16 rounding, and the rank of the change.
   Mukherjee et al. 2025, "Reinforcement Learning Finetunes Small Subnetworks in LLMs" (RL
   updates 5-30% of the parameters, at nearly full rank); "The Path Not Taken" (2025: part of
   that sparsity is bf16 rounding hiding small updates). LoRA: `calc_lora_singular_values`.
2. Which tokens changed (`get_token_changes`, `rank_token_shifts`): the exact KL at each position
   of sampled answers, and the tokens whose log-probs rose and fell most ("Sparse but Critical",
   2026: the change sits at a few token positions).
3. What direction was learnt (`get_mean_activation_difference`, `apply_logit_lens`, `steering`):
   the activation-difference lens of Minder et al. 2025: the mean residual difference on neutral
   text, read through the unembedding, names what the fine-tuning was for, and adding it to the
   base model's residual stream brings the behaviour back.
4. Where the reward comes from (`get_logit_attribution`): direct logit attribution of the reward's
   tokens to each head and MLP (Lee et al. 2024: DPO leaves GPT-2's toxic MLP vectors in place and
   routes around them); `get_value_responses` reads what moves the value head.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.losses import calc_exact_kl, get_gen_logprobs
from minirlhf.models import generated_states, run_model
from minirlhf.rewards import get_rewards
from minirlhf.runtime.steering import ResidualShift
from minirlhf.sampling import Samples, SamplingConfig, get_samples

# ---------------------------------------------------------------- 1. which weights moved

CHANGE_THRESHOLD = 1e-5
"""An entry 'moved' when |after - before| exceeds this (Mukherjee et al.'s tolerance)."""


class WeightChange(NamedTuple):
    """How one weight of the model changed in training."""

    name: str
    layer: int | None
    """The block it belongs to (None: embedding, unembedding, final norm)."""
    n_entries: int
    relative_change: float
    """||after - before|| / ||before|| (Frobenius; inf where the weight was 0)."""
    frac_changed: float
    """The share of entries with |after - before| > threshold."""
    frac_bf16: float
    """The share of entries whose bfloat16-rounded value changed: what a bf16 copy would show."""
    rank: int
    """The numerical rank of the change as the matrix the weight applies (0: unchanged)."""
    effective_rank: float
    """exp(entropy of the normalised singular values) (Roy and Vetterli 2007); 0: unchanged."""


def as_matrix(name: str, weight: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """A TransformerLens weight as the matrix it applies: W_Q/K/V [head, d_model, d_head] ->
    [d_model, head * d_head], W_O [head, d_head, d_model] -> [head * d_head, d_model]; biases
    flattened to a vector; 2-D weights as they are."""
    short = name.rsplit(".", 1)[-1].lstrip("_")
    if weight.ndim == 3 and short in ("W_Q", "W_K", "W_V"):
        return einops.rearrange(weight, "head d_model d_head -> d_model (head d_head)")
    if weight.ndim == 3 and short == "W_O":
        return einops.rearrange(weight, "head d_head d_model -> (head d_head) d_model")
    is_bias = short.startswith("b")  # b_Q [head, d_head] is a vector too, not a matrix
    return weight.flatten() if weight.ndim != 2 or is_bias else weight


def calc_changed_share(
    before: Float[Tensor, "..."], after: Float[Tensor, "..."], threshold: float = CHANGE_THRESHOLD
) -> Float[Tensor, ""]:
    """The share of entries whose change |after - before| exceeds `threshold`."""
    return ((after.float() - before.float()).abs() > threshold).float().mean()


def calc_bf16_share(before: Float[Tensor, "..."], after: Float[Tensor, "..."]) -> Float[Tensor, ""]:
    """The share of entries whose value changes once both are rounded to bfloat16."""
    return (after.bfloat16() != before.bfloat16()).float().mean()


def calc_rank(delta: Float[Tensor, "rows cols"], eps: float) -> tuple[int, float]:
    """The numerical rank of `delta` (singular values above max(rows, cols) * eps * the largest,
    `torch.linalg.matrix_rank`'s tolerance; `eps` of the weights' dtype) and its effective rank.
    The singular values are the square roots of the eigenvalues of the smaller Gram matrix, in
    float64 (a few times faster than an SVD; their rounding, near 1e-7 of the largest, stays far
    below that tolerance)."""
    if not delta.any():
        return 0, 0.0
    delta = delta.double()
    gram = delta @ delta.T if delta.shape[0] <= delta.shape[1] else delta.T @ delta
    sigma = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()
    rank = int((sigma > sigma[0] * max(delta.shape) * eps).sum())
    p = sigma / sigma.sum()
    p = p[p > 0]
    return rank, math.exp(-(p * p.log()).sum().item())


def calc_weight_change(
    name: str, before: Float[Tensor, "..."], after: Float[Tensor, "..."],
    threshold: float = CHANGE_THRESHOLD,
) -> WeightChange:
    """How the weight `name` changed from `before` to `after`."""
    delta = as_matrix(name, after.detach().float() - before.detach().float())
    if delta.ndim == 2:
        rank, effective = calc_rank(delta, torch.finfo(before.dtype).eps)
    else:  # a vector (bias, norm gain): rank 1 if it moved at all
        rank = effective = int(bool(delta.any()))
    norm = before.detach().float().norm().item()
    parts = name.split(".")
    return WeightChange(
        name, int(parts[1]) if parts[0] == "blocks" else None, before.numel(),
        delta.norm().item() / norm if norm else math.inf * bool(delta.any()),
        calc_changed_share(before, after, threshold).item(),
        calc_bf16_share(before, after).item(), rank, float(effective))


@torch.no_grad()
def get_weight_changes(
    reference: HookedTransformer, trained: HookedTransformer, threshold: float = CHANGE_THRESHOLD
) -> list[WeightChange]:
    """`calc_weight_change` of every parameter, in the model's order."""
    before, after = dict(reference.named_parameters()), dict(trained.named_parameters())
    assert before.keys() == after.keys(), (
        f"the models' weights differ by name: {sorted(before.keys() ^ after.keys())[:5]} (merge "
        "LoRA adapters first: `lora.merge_lora`)")
    return [calc_weight_change(name, before[name], after[name], threshold) for name in before]


def get_moved_shares(changes: list[WeightChange]) -> tuple[float, float]:
    """The share of all the model's parameters that moved: beyond the threshold, and in bf16."""
    total = sum(c.n_entries for c in changes)
    return (sum(c.frac_changed * c.n_entries for c in changes) / total,
            sum(c.frac_bf16 * c.n_entries for c in changes) / total)


def calc_lora_singular_values(
    A: Float[Tensor, "rank d_in"], B: Float[Tensor, "d_out rank"], scale: float
) -> Float[Tensor, " rank"]:
    """The singular values of a LoRA adapter's change scale * B @ A, from two QR decompositions:
    B A = Q_B (R_B R_A^T) Q_A^T, so only a rank x rank matrix is decomposed."""
    _, r_b = torch.linalg.qr(B.detach().double())
    _, r_a = torch.linalg.qr(A.detach().double().T)
    return (torch.linalg.svdvals(r_b @ r_a.T) * abs(scale)).float()


# ---------------------------------------------------------------- 2. which tokens changed


class TokenChanges(NamedTuple):
    """What the trained policy makes of sampled answers, compared with the reference."""

    gen_tokens: Int[Tensor, "batch gen_len"]
    kl: Float[Tensor, "batch gen_len"]
    """Exact KL(trained || reference) of the next-token distribution that chose each token."""
    logprob_shift: Float[Tensor, "batch gen_len"]
    """log pi_trained(token) - log pi_ref(token) of each generated token."""


def calc_per_token_kl(
    logits: Float[Tensor, "batch seq d_vocab"], ref_logits: Float[Tensor, "batch seq d_vocab"]
) -> Float[Tensor, "batch seq"]:
    """KL(trained || reference) at each position, summed over the vocabulary, in nats (the
    trainer's exact KL, `losses.calc_exact_kl`)."""
    return calc_exact_kl(logits, ref_logits)


@torch.no_grad()
def get_token_changes(
    trained: HookedTransformer, reference: HookedTransformer, samples: Samples
) -> TokenChanges:
    """The per-token KL and log-prob shift of `samples`' generated tokens (temperature 1)."""
    states = generated_states(samples.prefix_len)
    logits, _ = run_model(trained, samples.sample_ids, samples.attention_mask, True, states)
    ref_logits, _ = run_model(reference, samples.sample_ids, samples.attention_mask, True, states)
    gen_tokens = samples.sample_ids[:, samples.prefix_len:]
    shift = get_gen_logprobs(logits, gen_tokens) - get_gen_logprobs(ref_logits, gen_tokens)
    return TokenChanges(gen_tokens, calc_per_token_kl(logits, ref_logits), shift)


class TokenShifts(NamedTuple):
    """A per-token quantity averaged over each token id's occurrences, highest mean first."""

    token_ids: Int[Tensor, " n"]
    mean_shift: Float[Tensor, " n"]
    counts: Int[Tensor, " n"]


def rank_token_shifts(
    tokens: Int[Tensor, "batch gen_len"], shifts: Float[Tensor, "batch gen_len"],
    min_count: int = 1,
) -> TokenShifts:
    """The mean of `shifts` over the occurrences of each token id seen at least `min_count` times,
    sorted from the largest mean to the smallest (rose most first, fell most last)."""
    ids, inverse, counts = torch.unique(tokens.flatten(), return_inverse=True, return_counts=True)
    sums = torch.zeros(len(ids), dtype=torch.float64, device=tokens.device)
    sums.index_add_(0, inverse, shifts.flatten().double())
    keep = counts >= min_count
    means = (sums / counts)[keep].float()
    order = means.argsort(descending=True)
    return TokenShifts(ids[keep][order], means[order], counts[keep][order])


def get_value_responses(
    values: Float[Tensor, "batch seq"], prefix_len: int
) -> Float[Tensor, "batch gen_len"]:
    """How much each generated token moved the value estimate: V(after it) - V(before it)."""
    return values[:, prefix_len:] - values[:, prefix_len - 1:-1]


# ---------------------------------------------------------------- 3. what direction was learnt


def resid_hook(layer: int) -> str:
    """The residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


@torch.no_grad()
def get_residuals(
    model: HookedTransformer, tokens: Int[Tensor, "batch seq"]
) -> Float[Tensor, "layer batch seq d_model"]:
    """The residual stream after each block."""
    names = [resid_hook(layer) for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[name] for name in names]).float()


def get_mean_activation_difference(
    trained: HookedTransformer, reference: HookedTransformer, tokens: Int[Tensor, "batch seq"],
    skip: int = 0,
) -> Float[Tensor, "layer d_model"]:
    """The mean over `tokens` (its first `skip` positions left out: BOS) of the trained policy's
    residual stream minus the reference's, after each block (Minder et al. 2025)."""
    difference = get_residuals(trained, tokens) - get_residuals(reference, tokens)
    return difference[:, :, skip:].mean(dim=(1, 2))


@torch.no_grad()
def apply_logit_lens(
    model: HookedTransformer, residual: Float[Tensor, "*batch d_model"]
) -> Float[Tensor, "*batch d_vocab"]:
    """Read residual vectors as next-token logits: the final norm, then W_U. The unembedding's
    bias is left out: it is the same for every input, so it is no part of a direction."""
    flat = residual.to(model.W_U.dtype).reshape(1, -1, residual.shape[-1])  # [1, pos, d_model]
    logits = model.ln_final(flat) @ model.W_U
    return logits.reshape(*residual.shape[:-1], -1).float()


def top_tokens(
    model: HookedTransformer, logits: Float[Tensor, " d_vocab"], k: int
) -> tuple[list[str], list[str]]:
    """The k most promoted and the k most suppressed tokens of `logits`, as text."""
    order = logits.argsort(descending=True)
    return ([model.to_single_str_token(int(i)) for i in order[:k]],
            [model.to_single_str_token(int(i)) for i in order.flip(0)[:k]])


@contextmanager
def steering(
    model: HookedTransformer, layer: int, direction: Float[Tensor, " d_model"], scale: float
) -> Iterator[HookedTransformer]:
    """Inside the block, `model` adds scale * direction to the residual stream after block
    `layer`, at every position (on the fast path too: `runtime.steering`)."""
    shift = ResidualShift(torch.tensor([scale]), direction)
    with model.hooks(fwd_hooks=[(resid_hook(layer), shift)]):
        yield model


@contextmanager
def steering_grid(
    model: HookedTransformer, directions: Float[Tensor, "layer d_model"],
    grid: list[tuple[int, float]],
) -> Iterator[HookedTransformer]:
    """`steering` for several (layer, scale) settings in one batch: inside the block, copy c of
    the batch (its rows c * n .. (c + 1) * n - 1, for a batch of len(grid) * n rows) gets
    scale * directions[layer] of grid[c] added after that block."""
    hooks = []
    for layer in sorted({layer for layer, _ in grid}):
        scales = torch.tensor([scale if at == layer else 0.0 for at, scale in grid])
        hooks.append((resid_hook(layer), ResidualShift(scales, directions[layer])))
    with model.hooks(fwd_hooks=hooks):
        yield model


def get_mean_rewards(
    model: HookedTransformer, prompts: list[str], reward_fn: Callable, gen_len: int,
    prepend_bos: bool, seed: int, fast_path: bool = True, copies: int = 1,
) -> Float[Tensor, " copies"]:
    """The mean reward of one answer to each prompt (plain sampling, seeded), for each of
    `copies` copies of the prompts sampled in one batch (copy-major, as `steering_grid` expects);
    the reward function is given the answer alone as `responses` where it asks for it."""
    samples = get_samples(model, prompts * copies, gen_len=gen_len, sampling=SamplingConfig(),
                          prepend_bos=prepend_bos, seed=seed, fast_path=fast_path)
    return get_copy_rewards(samples, reward_fn, copies)


def get_copy_rewards(samples: Samples, reward_fn: Callable, copies: int = 1
                     ) -> Float[Tensor, " copies"]:
    """The mean reward of each of `copies` equal copies of the batch (rows copy-major)."""
    rewards = get_rewards(reward_fn, samples.texts, prompts=samples.prompts,
                          responses=samples.responses)
    return rewards.view(copies, -1).mean(dim=1)


def get_mean_reward(
    model: HookedTransformer, prompts: list[str], reward_fn: Callable, gen_len: int,
    prepend_bos: bool, seed: int, fast_path: bool = True,
) -> float:
    """`get_mean_rewards` of one copy, as a float."""
    return get_mean_rewards(model, prompts, reward_fn, gen_len, prepend_bos, seed,
                            fast_path).item()


def get_steering_rewards(
    reference: HookedTransformer, directions: Float[Tensor, "layer d_model"], layers: list[int],
    scales: list[float], reward: Callable[[HookedTransformer, bool, int], Tensor],
) -> Float[Tensor, "n_layers n_scales"]:
    """The mean reward of the reference steered by `scales[j] * directions[layer]` at each of
    `layers[i]`, in row i, column j. Every setting is sampled in one batch:
    `reward(model, fast_path, copies)` returns each copy's mean reward."""
    grid = [(layer, scale) for layer in layers for scale in scales]
    with steering_grid(reference, directions, grid):
        rewards = reward(reference, True, len(grid))
    return rewards.view(len(layers), len(scales))


# ---------------------------------------------------------------- 4. where the reward comes from


def get_reward_direction(
    model: HookedTransformer, promoted: list[int], suppressed: list[int] | None = None
) -> Float[Tensor, " d_model"]:
    """The unembedding direction of 'the promoted tokens' logits minus the suppressed ones'' (all
    tokens when None: the mean logit): W_U[:, promoted].mean - W_U[:, suppressed].mean."""
    W_U = model.W_U.detach().float()
    against = W_U.mean(dim=1) if suppressed is None else W_U[:, suppressed].mean(dim=1)
    return W_U[:, promoted].mean(dim=1) - against


class LogitAttribution(NamedTuple):
    """Each component's direct contribution to the reward direction's logit difference."""

    labels: list[str]
    """TransformerLens's names: "embed", "pos_embed", "L{layer}H{head}", "{layer}_mlp_out",
    "bias"."""
    attribution: Float[Tensor, " component"]
    """Mean over the batch and positions; they sum to the logit difference itself."""


@torch.no_grad()
def get_logit_attribution(
    model: HookedTransformer, tokens: Int[Tensor, "batch seq"],
    direction: Float[Tensor, " d_model"], attention_mask: Int[Tensor, "batch seq"] | None = None,
) -> LogitAttribution:
    """Direct logit attribution: every head's, MLP's and embedding's output, scaled by the final
    norm's scale at that position, projected on `direction` (the unembedding's bias left out),
    averaged over the real positions (`attention_mask` 1; None: all). The components and labels
    of TransformerLens's `get_full_resid_decomposition(apply_ln=True)`, without building its
    [component, batch, seq, d_model] stack: each head's output is z @ W_O, so its projection is
    z @ (W_O @ direction), one number per position."""
    names = ("hook_z", "hook_mlp_out", "hook_embed", "hook_pos_embed", "ln_final.hook_scale")
    _, cache = model.run_with_cache(tokens, attention_mask=attention_mask,
                                    names_filter=lambda name: name.endswith(names))
    d = direction.to(model.W_U.device).float()
    if model.cfg.normalization_type in ("LN", "LNPre"):  # the norm centres each component
        d = d - d.mean()
    scale = cache["ln_final.hook_scale"].float()  # [batch, seq, 1]
    rows, labels = [], []
    for layer in range(model.cfg.n_layers):
        read_out = model.blocks[layer].attn.W_O.detach().float() @ d  # [head, d_head]
        heads = einops.einsum(cache["z", layer].float(), read_out,
                              "batch seq head d_head, head d_head -> head batch seq")
        rows += list(heads)
        labels += [f"L{layer}H{head}" for head in range(model.cfg.n_heads)]
    for layer in range(model.cfg.n_layers):
        rows.append(cache["mlp_out", layer].float() @ d)
        labels.append(f"{layer}_mlp_out")
    rows.append(cache["hook_embed"].float() @ d)
    labels.append("embed")
    if "hook_pos_embed" in cache:
        rows.append(cache["hook_pos_embed"].float() @ d)
        labels.append("pos_embed")
    rows.append(sum(block.attn.b_O.detach().float() for block in model.blocks) @ d
                * torch.ones_like(rows[0]))  # the attention biases, summed over the blocks
    labels.append("bias")
    attribution = torch.stack(rows) / scale[..., 0]
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    weights = (mask / mask.sum()).to(attribution)
    return LogitAttribution(labels, (attribution * weights).sum(dim=(1, 2)))
