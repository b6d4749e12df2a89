"""The per-token quantities of the objective, a few generated positions at a time.

Stage 6 of the pipeline, below the objective's terms (`losses`). The learning step and the
rollout evaluation need, at each generated position, three numbers read off the policy's
distribution over the whole vocabulary: the log-prob of the token it took, its entropy, and the
exact KL to the reference. Computing them from whole [rows, gen_len, d_vocab] tensors holds
several of those alive for the backward pass (the logits, their log-softmax, the probabilities,
the products); for SmolLM2 (49,152 tokens) each is 100 MB for 8 rows of 64 tokens.

Here the positions are taken `CHUNK_TOKENS // rows` at a time: a chunk's logits come from a
callable (the policy's final residual times the unembedding, for that chunk only), ONE
log-softmax serves all three quantities, and only they (rows x chunk floats) leave the chunk.
Under gradients each chunk is checkpointed (`torch.utils.checkpoint`): the backward pass reruns
the chunk's unembedding and log-softmax instead of keeping them, so the vocabulary-sized
tensors of one chunk at a time are all that ever exist. The numbers are those of
`losses.get_gen_logprobs`, `losses.calc_entropy` and `losses.calc_exact_kl` (the same formulas,
tests/test_chunked.py checks values and gradients against them).

Reference: the fused, chunked language-model heads of Liger-Kernel and TRL (GPU kernels); this
is the same idea in plain torch.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from eindex import eindex
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from minirlhf.losses import KL_ESTIMATORS, calc_kl_k3_is

CHUNK_TOKENS = 256
"""Rows x positions per chunk: 256 x 49,152 float32 logits are 50 MB (SmolLM2)."""

RECOMPUTE_ABOVE_TOKENS = 1024
"""Under gradients, up to this many rows x generated positions each chunk keeps its log-softmax
for a written-out backward (`KeptLogSoftmaxStats`: one d_vocab float per token, 200 MB for
SmolLM2 at 1,024 tokens; no unembedding rerun); above it, each chunk is checkpointed, keeping
nothing vocabulary-sized, and the backward pass reruns its unembedding (one more matmul of the
unembedding's size per learning step)."""

ChunkLogits = Callable[[slice], Float[Tensor, "batch chunk d_vocab"]]
"""The logits / temperature at a slice of the generated positions (all rows)."""


class TokenStats(NamedTuple):
    """What one pass over the policy's (and the reference's) distributions gives per token."""

    logprobs: Float[Tensor, "batch gen_len"]
    """The policy's log-prob of each generated token."""
    entropy: Float[Tensor, "batch gen_len"]
    """The entropy of the policy at each generated position."""
    exact_kl: Float[Tensor, "batch gen_len"] | None
    """KL(policy || reference), summed over the vocabulary (None without a reference)."""
    ref_logprobs: Float[Tensor, "batch gen_len"] | None
    """The reference's log-prob of each generated token (None without a reference)."""


def calc_token_stats(
    logits: Float[Tensor, "batch chunk d_vocab"],
    gen_tokens: Int[Tensor, "batch chunk"],
    ref_logits: Float[Tensor, "batch chunk d_vocab"] | None = None,
) -> TokenStats:
    """`TokenStats` of some positions from their logits, with one log-softmax of the policy's.

    Args:
        logits: the policy's logits / temperature at the positions that chose `gen_tokens`.
        ref_logits: the reference's, the same way (None: no KL, no reference log-probs).
    """
    return stats_from_logprobs(logits.float().log_softmax(dim=-1), gen_tokens, ref_logits)[0]


def stats_from_logprobs(
    logprobs: Float[Tensor, "batch chunk d_vocab"],
    gen_tokens: Int[Tensor, "batch chunk"],
    ref_logits: Float[Tensor, "batch chunk d_vocab"] | None = None,
) -> tuple[TokenStats, Float[Tensor, "batch chunk"] | None]:
    """`calc_token_stats` from the policy's log-softmax; also the KL before its clamp at 0."""
    probs = logprobs.exp()
    # A token of probability 0 (a masked, -inf logit) adds nothing to the entropy or the KL;
    # zeroing its log-prob before the product keeps the gradient finite (0 * -inf is NaN).
    impossible = probs == 0
    finite = logprobs.masked_fill(impossible, 0.0)
    taken = eindex(logprobs, gen_tokens, "b s [b s]")
    entropy = -(probs * finite).sum(dim=-1)
    if ref_logits is None:
        return TokenStats(taken, entropy, None, None), None
    ref_logprobs = ref_logits.float().log_softmax(dim=-1)
    log_ratio = finite - ref_logprobs.masked_fill(impossible, 0.0)
    raw_kl = (probs * log_ratio).sum(dim=-1)
    exact_kl = raw_kl.clamp(min=0.0)  # rounding can make it < 0
    ref_taken = eindex(ref_logprobs, gen_tokens, "b s [b s]")
    return TokenStats(taken, entropy, exact_kl, ref_taken), raw_kl


def calc_kl_from_stats(
    estimator: str, stats: TokenStats, old_logprobs: Float[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """KL(policy || reference) at each position by `estimator` (`RLHFArgs.kl_estimator`), from
    `TokenStats`: what `losses.calc_kl` gives on the logits they were computed from
    (`old_logprobs`: the sampling policy's, for "k3_is"; None: on-policy)."""
    if estimator == "exact":
        return stats.exact_kl
    if estimator == "k3_is":
        old = stats.logprobs.detach() if old_logprobs is None else old_logprobs
        return calc_kl_k3_is(stats.logprobs, stats.ref_logprobs, old)
    return KL_ESTIMATORS[estimator](stats.logprobs, stats.ref_logprobs)


def get_chunk_positions(rows: int, chunk_tokens: int | None = None) -> int:
    """How many generated positions one chunk takes so it holds about `chunk_tokens` tokens
    (None: `CHUNK_TOKENS`), at least one."""
    return max(1, (chunk_tokens or CHUNK_TOKENS) // max(1, rows))


def get_token_stats(
    get_logits: ChunkLogits,
    gen_tokens: Int[Tensor, "batch gen_len"],
    get_ref_logits: ChunkLogits | None = None,
    chunk_positions: int | None = None,
) -> TokenStats:
    """`calc_token_stats` over all generated positions, `chunk_positions` at a time (None:
    `get_chunk_positions`), never holding more than one chunk's vocabulary-sized tensors.

    With gradients on, each chunk keeps its log-softmax for a written-out backward, or, above
    `RECOMPUTE_ABOVE_TOKENS` tokens, is checkpointed: its logits are computed again in the
    backward pass from what `get_logits` reads (the final residual and the unembedding).

    Args:
        get_logits: the policy's logits / temperature at a slice of positions.
        get_ref_logits: the reference's (no gradient flows into it), or None.
    """
    gen_len = gen_tokens.shape[1]
    step = chunk_positions or get_chunk_positions(gen_tokens.shape[0])
    if step < 1:
        raise ValueError(f"chunk_positions must be at least 1, got {chunk_positions}.")
    recompute = gen_tokens.numel() > RECOMPUTE_ABOVE_TOKENS or get_ref_logits is None
    parts = [_get_chunk_stats(get_logits, gen_tokens, get_ref_logits, slice(i, i + step),
                              recompute) for i in range(0, gen_len, step)]
    joined = [None if part[0] is None else torch.cat(part, dim=1) for part in zip(*parts)]
    return TokenStats(*joined)


class KeptLogSoftmaxStats(torch.autograd.Function):
    """`calc_token_stats` (with a reference) whose backward pass is written out: it keeps the
    chunk's log-softmax (and the reference's logits it was given) instead of autograd's several
    vocabulary-sized tensors, and recomputes nothing. With p = softmax(z), H the entropy and
    KL the exact KL: d log p_y / dz = onehot(y) - p, dH/dz = -p (log p + H),
    dKL/dz = p (log p - log q - KL)."""

    @staticmethod
    def forward(ctx, logits: Tensor, gen_tokens: Tensor, ref_logits: Tensor):
        logprobs = logits.float().log_softmax(dim=-1)
        stats, raw_kl = stats_from_logprobs(logprobs, gen_tokens, ref_logits)
        ctx.save_for_backward(logprobs, gen_tokens, ref_logits, stats.entropy, raw_kl)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(stats.ref_logprobs)
        return tuple(stats)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, grad_kl, _):
        logprobs, gen_tokens, ref_logits, entropy, raw_kl = ctx.saved_tensors
        probs = logprobs.exp()
        impossible = probs == 0
        finite = logprobs.masked_fill(impossible, 0.0)
        ref_finite = ref_logits.float().log_softmax(dim=-1).masked_fill(impossible, 0.0)
        grad_kl = grad_kl * (raw_kl >= 0)  # the clamp at 0 passes no gradient below it
        grad = probs * (grad_kl[..., None] * (finite - ref_finite - raw_kl[..., None])
                        - grad_entropy[..., None] * (finite + entropy[..., None])
                        - grad_logprobs[..., None])
        grad.scatter_add_(-1, gen_tokens[..., None], grad_logprobs[..., None])
        return grad.to(ctx.logits_dtype), None, None


def _get_chunk_stats(
    get_logits: ChunkLogits,
    gen_tokens: Int[Tensor, "batch gen_len"],
    get_ref_logits: ChunkLogits | None,
    positions: slice,
    recompute: bool,
) -> TokenStats:
    """`calc_token_stats` of one chunk of positions; with gradients on, checkpointed
    (`recompute`) or through `KeptLogSoftmaxStats`."""
    def compute() -> TokenStats:
        ref_logits = None if get_ref_logits is None else get_ref_logits(positions)
        return calc_token_stats(get_logits(positions), gen_tokens[:, positions], ref_logits)

    if not torch.is_grad_enabled():
        return compute()
    if recompute:
        return checkpoint(compute, use_reentrant=False)
    return TokenStats(*KeptLogSoftmaxStats.apply(
        get_logits(positions), gen_tokens[:, positions], get_ref_logits(positions)))
