"""The fast path: a HookedTransformer's forward pass, the same logits, without per-call re-layout.

Part of the model layer (stages 1-2). `HookedTransformer.forward` keeps attention weights per head
(`W_Q: [n_heads, d_model, d_head]`) and multiplies with einsums, so every call copies the weights
into the layout a matrix multiply wants: a torch profile of one cached decoding step of SmolLM2 at
batch 32 spends 45% of its CPU time in `aten::copy_` and 44% in the matmuls themselves.

`get_fast_weights` lays the attention weights out once, as the matrices `F.linear` reads, with Q,
K and V fused into one matrix per layer (the MLP and unembedding weights are read in place;
the containers are in `runtime.fast_weights`). The forward pass below computes exactly what
TransformerLens computes (tests/test_fast_path.py checks the logits against
`HookedTransformer.forward`), block by block with the pieces of `runtime.fast_blocks`.

- Rollouts lay the weights out once per phase, under `torch.no_grad`, and reuse them for every
  decoding step (`forward` over the prompt, then over one new token at a time, with a key-value
  cache from `make_cache`).
- Training lays them out on every forward pass *with* gradients: the concatenations are
  differentiable, so gradients flow back into the HookedTransformer's own parameters.

Hooks do not run on this path, so a model with hooks attached (ablations, caching) is not
supported: `unsupported_reason` says so, and the model and sampler then use the model's own
forward, where the hooks run. Two kinds of hooks are computed here instead: LoRA's
(`runtime.lora`) and steering's (`runtime.steering.ResidualShift`).

Supported: GPT-2 and Llama style models (LayerNorm or RMSNorm,
folded or not; learned or rotary positions; plain or gated MLP; grouped-query attention), the
models `minirlhf.runtime.loading` builds.
"""

import warnings
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformer_lens import HookedTransformer

from minirlhf.runtime.fast_blocks import ACTIVATIONS, KeyValues, normalize, run_block
from minirlhf.runtime.fast_weights import FastWeights, OutputWeights, get_layer_weights
from minirlhf.runtime.lora import LORA_HOOKS, get_adapters
from minirlhf.runtime.steering import ResidualShift, get_shifts

_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


def has_hooks(model: HookedTransformer) -> bool:
    """Whether a user's hook is attached to the model's hook points (`model.add_hook(...)`).
    LoRA's own hooks (`runtime.lora`) and steering's (`runtime.steering`) do not count: the fast
    path computes them."""
    for point in model.hook_dict.values():
        own = sum(isinstance(handle.user_hook, (*LORA_HOOKS, ResidualShift))
                  for handle in point.fwd_hooks)
        if len(point._forward_hooks) > own or point._forward_pre_hooks or point._backward_hooks:
            return True
    return False


def unsupported_reason(model: HookedTransformer) -> str | None:
    """Why the fast path cannot run this model now, or None when it can."""
    cfg = model.cfg
    checks = [
        (cfg.normalization_type in _NORMS, f"normalization_type {cfg.normalization_type!r}"),
        (cfg.act_fn in ACTIVATIONS, f"act_fn {cfg.act_fn!r}"),
        (cfg.positional_embedding_type in ("standard", "rotary"),
         f"positional_embedding_type {cfg.positional_embedding_type!r}"),
        (not cfg.parallel_attn_mlp, "parallel attention and MLP"),
        (not cfg.attn_only, "attention-only models"),
        (not cfg.use_normalization_before_and_after, "normalisation before and after blocks"),
        (not cfg.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx"),
        (cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM",
                                           "Olmo3ForCausalLM", "Gemma2ForCausalLM",
                                           "Gemma3ForCausalLM"), "this architecture's extras"),
        (getattr(cfg, "clip_qkv", None) is None, "clip_qkv"),
        (not getattr(cfg, "use_attention_sinks", False), "attention sinks"),
        (not getattr(cfg, "use_qk_norm", False), "QK norm"),
        (getattr(cfg, "attention_dir", "causal") == "causal", "bidirectional attention"),
        (getattr(cfg, "window_size", None) is None, "local attention"),
        (getattr(cfg, "output_logits_soft_cap", -1.0) <= 0, "logit soft-capping"),
        (getattr(cfg, "attn_scores_soft_cap", -1.0) <= 0, "attention soft-capping"),
        (not getattr(cfg, "load_in_4bit", False), "4-bit weights"),
        (not has_hooks(model), "hooks attached to the model (they run on its own forward only)"),
    ]
    failed = [what for ok, what in checks if not ok]
    return ", ".join(failed) if failed else None


def use_fast_path(model: HookedTransformer, requested: bool = True) -> bool:
    """Whether a forward pass of `model` should go through the fast path: when `requested` and
    the fast path can run the model. A model with hooks attached falls back to its own forward
    (with a warning), so that the hooks still act."""
    if not requested:
        return False
    reason = unsupported_reason(model)
    if reason is not None and has_hooks(model):
        warnings.warn("Hooks are attached to the model, so it runs on TransformerLens's forward "
                      "(slower) instead of the fast path, where hooks would not run.", stacklevel=3)
    return reason is None


def get_output_weights(model: HookedTransformer) -> OutputWeights:
    """The weights `unembed` needs, read in place (no copy: cheap to call every time)."""
    return OutputWeights(
        ln_final_w=getattr(model.ln_final, "w", None),
        ln_final_b=getattr(model.ln_final, "b", None),
        unembed=model.unembed.W_U.T,
        unembed_b=model.unembed.b_U,
    )


def get_fast_weights(
    model: HookedTransformer, from_layer: int = 0, to_layer: int | None = None
) -> FastWeights:
    """Lay out the model's weights for `forward` (differentiable: call it under `no_grad` to lay
    them out once for many inference calls, or with gradients on for a training step).

    LoRA adapters (`runtime.lora`) that are on are merged into the matrices under `no_grad` and
    kept as low-rank terms otherwise. Only blocks `from_layer` to `to_layer` (exclusive; None:
    the last) are laid out: a forward that starts from a cached residual stream, or stops early
    to compute a frozen trunk, needs no others."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise NotImplementedError(
            f"minirlhf's fast path does not support {reason}: run the HookedTransformer's own "
            "forward instead (models and the sampler take fast_path=False)."
        )
    cfg = model.cfg
    rotary = cfg.positional_embedding_type == "rotary"
    attn, adapters = model.blocks[0].attn, get_adapters(model)
    return FastWeights(
        embed=model.embed.W_E,
        pos_embed=None if rotary else model.pos_embed.W_pos,
        layers=[get_layer_weights(block, cfg.gated_mlp, adapters, i)
                if from_layer <= i < (cfg.n_layers if to_layer is None else to_layer) else None
                for i, block in enumerate(model.blocks)],
        output=get_output_weights(model),
        rotary_cos=attn.rotary_cos if rotary else None,
        rotary_sin=attn.rotary_sin if rotary else None,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
        d_head=cfg.d_head,
        norm=cfg.normalization_type,
        eps=cfg.eps,
        act_fn=cfg.act_fn,
        attn_scale=cfg.attn_scale if cfg.use_attn_scale else 1.0,
        rotary_dim=cfg.rotary_dim or cfg.d_head,
        rotary_adjacent_pairs=cfg.rotary_adjacent_pairs,
        shifts=get_shifts(model),
    )


# ---------------------------------------------------------------- whole forward passes


def get_position_ids(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Each token's position counted from the row's first real token (left padding gets 0)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def _causal_padding_mask(
    attention_mask: Int[Tensor, "batch seq"], start: int, pos: int
) -> Bool[Tensor, "batch 1 new_seq key"]:
    """[batch, 1, pos, start + pos] booleans: causal and never attending to left padding.

    A padding query may attend to itself, so its softmax has one term instead of none (no NaN);
    no real token reads a padding position, so its output never matters.
    """
    keys = torch.arange(start + pos, device=attention_mask.device)
    queries = keys[start:, None]
    allowed = (keys[None, :] <= queries) & attention_mask[:, None, : start + pos].bool()
    allowed = allowed | (keys[None, :] == queries)
    return allowed[:, None]


def forward(
    weights: FastWeights,
    tokens: Int[Tensor, "batch new_seq"],
    attention_mask: Int[Tensor, "batch seq"] | None = None,
    cache: list[tuple[KeyValues, KeyValues]] | None = None,
    start: int = 0,
    layers: slice = slice(None),
    residual: Float[Tensor, "batch new_seq d_model"] | None = None,
    checkpoint_blocks: bool = False,
) -> Float[Tensor, "batch new_seq d_model"]:
    """The final normalised residual stream, as `ln_final.hook_normalized` holds it: before the
    final norm's gain and bias (what the value head reads; `unembed` applies the gain and bias).

    Args:
        tokens: the tokens at positions `start .. start + new_seq` of the sequence.
        attention_mask: 1 for real tokens, 0 for left padding, for positions `0 .. start + new_seq`
            (None: no padding, plain causal attention).
        cache: per layer, preallocated (keys, values) of shape [batch, kv_heads, max_len, d_head];
            positions before `start` must already hold the earlier tokens' keys and values.
        layers: run only these blocks. `slice(None, k)` stops before block k and returns the
            residual stream entering it (not normalised): a frozen trunk's output.
            `slice(k, None)` starts at block k from `residual`, that output.
        checkpoint_blocks: with gradients on, keep each block's input, not its activations, and
            run the block again in the backward pass (activation checkpointing).
    """
    position_ids, causal, attn_mask = _get_positions_and_mask(tokens, attention_mask, start)
    if residual is None:
        residual = _embed(weights, tokens, position_ids)
    rotary = _get_rotary(weights, position_ids)
    first, stop, _ = layers.indices(len(weights.layers))
    step = (partial(checkpoint, run_block, use_reentrant=False)
            if checkpoint_blocks and cache is None and torch.is_grad_enabled() else run_block)
    for i in range(first, stop):
        kv = None if cache is None else (*cache[i], start)
        residual = step(residual, weights.layers[i], weights, rotary, attn_mask, causal, kv)
        for shift in weights.shifts.get(i, ()):  # steering (`runtime.steering`)
            residual = residual + shift.offsets(residual)
    if stop < len(weights.layers):
        return residual
    return normalize(residual, weights, None, None)  # ln_final.hook_normalized: no gain or bias


def _get_positions_and_mask(
    tokens: Int[Tensor, "batch new_seq"], attention_mask: Int[Tensor, "batch seq"] | None,
    start: int,
) -> tuple[Int[Tensor, "batch new_seq"], bool, Bool[Tensor, "batch 1 new_seq key"] | None]:
    """Each new token's position, and how attention is masked: (position ids, whether plain
    causal attention does, the explicit mask otherwise)."""
    batch, pos = tokens.shape
    if attention_mask is None:
        position_ids = torch.arange(start, start + pos, device=tokens.device).expand(batch, pos)
        attention_mask = torch.ones(batch, start + pos, dtype=torch.long, device=tokens.device)
    else:
        position_ids = get_position_ids(attention_mask)[:, start : start + pos]
    # No padding: plain causal attention (one new token attends to everything before it).
    # Padding, or several tokens after a filled cache: an explicit mask.
    causal, attn_mask = pos > 1, None
    if (pos > 1 and start > 0) or not bool(attention_mask.all()):
        causal, attn_mask = False, _causal_padding_mask(attention_mask, start, pos)
    return position_ids, causal, attn_mask


def _embed(
    weights: FastWeights, tokens: Int[Tensor, "batch new_seq"],
    position_ids: Int[Tensor, "batch new_seq"],
) -> Float[Tensor, "batch new_seq d_model"]:
    """The residual stream entering block 0: token embeddings (plus learned positions)."""
    residual = F.embedding(tokens, weights.embed)
    if weights.pos_embed is not None:
        residual = residual + weights.pos_embed[position_ids]
    return residual


def _get_rotary(
    weights: FastWeights, position_ids: Int[Tensor, "batch new_seq"]
) -> tuple[Float[Tensor, "batch 1 new_seq rotary_dim"],
           Float[Tensor, "batch 1 new_seq rotary_dim"]] | None:
    """The rotary cos and sin at each position (None for learned positions)."""
    if weights.rotary_cos is None:
        return None
    if int(position_ids.max()) >= weights.rotary_cos.shape[0]:
        raise ValueError(
            f"Position {int(position_ids.max())} is past the model's rotary table "
            f"({weights.rotary_cos.shape[0]} positions): use a shorter prompt or gen_len."
        )
    return weights.rotary_cos[position_ids][:, None], weights.rotary_sin[position_ids][:, None]


def unembed(
    weights: OutputWeights, final_residual: Float[Tensor, "*batch d_model"]
) -> Float[Tensor, "*batch d_vocab"]:
    """Logits from the final normalised residual stream (applies ln_final's gain and bias)."""
    if weights.ln_final_w is not None:
        final_residual = final_residual * weights.ln_final_w
    if weights.ln_final_b is not None:
        final_residual = final_residual + weights.ln_final_b
    return F.linear(final_residual, weights.unembed, weights.unembed_b)


def make_cache(
    weights: FastWeights, batch: int, max_len: int, dtype: torch.dtype, device: str | torch.device
) -> list[tuple[KeyValues, KeyValues]]:
    """An empty key-value cache for `max_len` positions."""
    shape = (batch, weights.n_kv_heads, max_len, weights.d_head)
    return [tuple(torch.empty(shape, dtype=dtype, device=device) for _ in "kv")
            for _ in weights.layers]

