"""The fast path: a HookedTransformer's forward pass, the same logits, without per-call re-layout.

Part of the model layer (stages 1-2). `HookedTransformer.forward` keeps attention weights per head
(`W_Q: [n_heads, d_model, d_head]`) and multiplies with einsums, so every call copies the weights
into the layout a matrix multiply wants: a torch profile of one cached decoding step of SmolLM2 at
batch 32 spends 45% of its CPU time in `aten::copy_` and 44% in the matmuls themselves.

`get_fast_weights` lays the attention weights out once, as the matrices `F.linear` reads, with Q,
K and V fused into one matrix per layer (the MLP and unembedding weights are read in place). The
forward pass below computes exactly what TransformerLens computes (tests/test_fast_path.py
checks the logits against `HookedTransformer.forward`), with `scaled_dot_product_attention`.

- Rollouts lay the weights out once per phase, under `torch.no_grad`, and reuse them for every
  decoding step (`forward` over the prompt, then over one new token at a time, with a key-value
  cache from `make_cache`).
- Training lays them out on every forward pass *with* gradients: the concatenations are
  differentiable, so gradients flow back into the HookedTransformer's own parameters.

Hooks do not run on this path, so a model with hooks attached (steering, ablations) is not
supported: `unsupported_reason` says so, and the model and sampler then use the model's own
forward, where the hooks run. Supported: GPT-2 and Llama style models (LayerNorm or RMSNorm,
folded or not; learned or rotary positions; plain or gated MLP; grouped-query attention), the
models `minirlhf.runtime.loading` builds.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.runtime.lora import LORA_HOOKS, LoraAdapters, get_adapters

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}
_NORMS = ("LN", "LNPre", "RMS", "RMSPre")
KeyValues = Float[Tensor, "batch kv_head max_len d_head"]
"""One layer's cached keys (or values), preallocated for `max_len` positions."""
LowRank = tuple[Float[Tensor, "rank d_in"], Float[Tensor, "d_out rank"]]
"""A LoRA term in `F.linear` layout: x -> (x @ down.T) @ up.T, the scale folded into `up`."""


def has_hooks(model: HookedTransformer) -> bool:
    """Whether a user's hook is attached to the model's hook points (`model.add_hook(...)`).
    LoRA's own hooks (`minirlhf.runtime.lora`) do not count: the fast path computes their adapters."""
    for point in model.hook_dict.values():
        own = sum(isinstance(handle.user_hook, LORA_HOOKS) for handle in point.fwd_hooks)
        if len(point._forward_hooks) > own or point._forward_pre_hooks or point._backward_hooks:
            return True
    return False


def unsupported_reason(model: HookedTransformer) -> str | None:
    """Why the fast path cannot run this model now, or None when it can."""
    cfg = model.cfg
    checks = [
        (cfg.normalization_type in _NORMS, f"normalization_type {cfg.normalization_type!r}"),
        (cfg.act_fn in _ACTIVATIONS, f"act_fn {cfg.act_fn!r}"),
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


@dataclass
class LayerWeights:
    """One transformer block's weights in `F.linear` layout ([out_features, in_features])."""

    ln1_w: Float[Tensor, " d_model"] | None
    ln1_b: Float[Tensor, " d_model"] | None
    w_qkv: Float[Tensor, "qkv d_model"]
    b_qkv: Float[Tensor, " qkv"]
    w_o: Float[Tensor, "d_model hd"]
    b_o: Float[Tensor, " d_model"]
    ln2_w: Float[Tensor, " d_model"] | None
    ln2_b: Float[Tensor, " d_model"] | None
    w_in: Float[Tensor, "d_mlp d_model"]
    b_in: Float[Tensor, " d_mlp"]
    w_gate: Float[Tensor, "d_mlp d_model"] | None
    """A gated MLP's gate (None for a plain MLP)."""
    w_out: Float[Tensor, "d_model d_mlp"]
    b_out: Float[Tensor, " d_model"]
    lora: dict[str, LowRank]
    """LoRA terms added to the matrices "qkv", "o", "in", "gate", "out" (training; empty when
    the adapters are merged into the matrices, off, or absent)."""


@dataclass
class OutputWeights:
    """What `unembed` reads: the final norm's gain and bias and the unembedding (in place)."""

    ln_final_w: Float[Tensor, " d_model"] | None
    ln_final_b: Float[Tensor, " d_model"] | None
    unembed: Float[Tensor, "d_vocab_out d_model"]
    unembed_b: Float[Tensor, " d_vocab_out"]


@dataclass
class FastWeights:
    """A whole model's weights laid out for `forward`, plus the config numbers it needs."""

    embed: Float[Tensor, "d_vocab d_model"]
    pos_embed: Float[Tensor, "n_ctx d_model"] | None
    layers: list[LayerWeights | None]
    """Per block; None for the blocks below `get_fast_weights`'s `from_layer` (not laid out)."""
    output: OutputWeights
    rotary_cos: Float[Tensor, "rot_ctx rotary_dim"] | None
    rotary_sin: Float[Tensor, "rot_ctx rotary_dim"] | None
    n_heads: int
    n_kv_heads: int
    d_head: int
    norm: str
    eps: float
    act_fn: str
    attn_scale: float
    rotary_dim: int
    rotary_adjacent_pairs: bool


def _heads_to_linear(weight: Float[Tensor, "head d_model d_head"]) -> Float[Tensor, "hd d_model"]:
    """[n_heads, d_model, d_head] (TransformerLens) -> [n_heads * d_head, d_model] (F.linear)."""
    return weight.permute(0, 2, 1).reshape(-1, weight.shape[1])


def _layer_weights(block, gated: bool, adapters: LoraAdapters | None, layer: int) -> LayerWeights:
    attn, mlp = block.attn, block.mlp
    # Grouped-query attention keeps the unrepeated K and V heads in _W_K / _W_V.
    matrices = {
        "q": _heads_to_linear(attn.W_Q),
        "k": _heads_to_linear(getattr(attn, "_W_K", attn.W_K)),
        "v": _heads_to_linear(getattr(attn, "_W_V", attn.W_V)),
        "o": attn.W_O.reshape(-1, attn.W_O.shape[-1]).T,  # x @ W_O without a copy
        "in": mlp.W_in.T, "gate": mlp.W_gate.T if gated else None, "out": mlp.W_out.T,
    }
    matrices, lora = _apply_lora(matrices, adapters, layer)
    b_k = getattr(attn, "_b_K", attn.b_K)
    b_v = getattr(attn, "_b_V", attn.b_V)
    return LayerWeights(
        ln1_w=getattr(block.ln1, "w", None), ln1_b=getattr(block.ln1, "b", None),
        w_qkv=torch.cat([matrices["q"], matrices["k"], matrices["v"]]),
        b_qkv=torch.cat([attn.b_Q.flatten(), b_k.flatten(), b_v.flatten()]),
        w_o=matrices["o"], b_o=attn.b_O,
        ln2_w=getattr(block.ln2, "w", None), ln2_b=getattr(block.ln2, "b", None),
        w_in=matrices["in"], b_in=mlp.b_in, w_gate=matrices["gate"],
        w_out=matrices["out"], b_out=mlp.b_out, lora=lora,
    )


def _apply_lora(
    matrices: dict[str, Tensor | None], adapters: LoraAdapters | None, layer: int
) -> tuple[dict[str, Tensor | None], dict[str, LowRank]]:
    """A layer's matrices with its adapters: merged into them (W + scale * B @ A) when no
    gradient is wanted (sampling, evaluation), else kept apart as low-rank terms, whose
    gradients are cheap. Adapters that are off (`lora.adapters_off`) or absent change nothing."""
    if adapters is None or not adapters.enabled:
        return matrices, {}
    present = {t: a for t in matrices if (a := adapters.get(layer, t)) is not None}
    if not torch.is_grad_enabled():
        merged = {t: w + present[t].delta().to(w.dtype) if t in present else w
                  for t, w in matrices.items()}
        return merged, {}
    lora = {t: (a.A, a.B * a.scale) for t, a in present.items() if t in ("o", "in", "gate", "out")}
    if any(t in present for t in "qkv"):  # one term for the fused QKV matrix
        downs, ups = [], []
        for t in "qkv":
            d_out, d_in = matrices[t].shape
            a = present.get(t)
            downs.append(a.A if a is not None else matrices[t].new_zeros(0, d_in))
            ups.append(a.B * a.scale if a is not None else matrices[t].new_zeros(d_out, 0))
        lora["qkv"] = (torch.cat(downs), torch.block_diag(*ups))
    return matrices, lora


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

    LoRA adapters (`minirlhf.runtime.lora`) that are on are merged into the matrices under `no_grad` and
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
        layers=[_layer_weights(block, cfg.gated_mlp, adapters, i)
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
    )


# ---------------------------------------------------------------- the pieces of a block


def _normalize(
    x: Float[Tensor, "*batch d_model"],
    weights: FastWeights,
    w: Float[Tensor, " d_model"] | None,
    b: Float[Tensor, " d_model"] | None,
) -> Float[Tensor, "*batch d_model"]:
    """LayerNorm or RMSNorm, as TransformerLens computes it (the *Pre variants have no w, b)."""
    if weights.norm.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + weights.eps)
    if w is not None:
        x = x * w
    return x + b if b is not None else x


def _rotate(
    x: Float[Tensor, "batch head new_seq d_head"],
    cos: Float[Tensor, "batch 1 new_seq rotary_dim"],
    sin: Float[Tensor, "batch 1 new_seq rotary_dim"],
    adjacent_pairs: bool,
) -> Float[Tensor, "batch head new_seq d_head"]:
    """Rotary embedding of the first rotary_dim features (Su et al. 2021)."""
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast x may be bfloat16
    if adjacent_pairs:  # GPT-J: rotate (x0, x1) pairs
        flipped = torch.stack([-rot[..., 1::2], rot[..., ::2]], dim=-1).flatten(-2)
    else:  # GPT-NeoX / Llama: rotate the two halves against each other
        half = rot.shape[-1] // 2
        flipped = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + flipped * sin, rest], dim=-1)


def get_position_ids(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Each token's position counted from the row's first real token (left padding gets 0)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def _attention(
    x: Float[Tensor, "batch new_seq d_model"],
    layer: LayerWeights,
    weights: FastWeights,
    rotary: tuple[Float[Tensor, "batch 1 new_seq rotary_dim"],
                  Float[Tensor, "batch 1 new_seq rotary_dim"]] | None,
    attn_mask: Bool[Tensor, "batch 1 new_seq key"] | None,
    causal: bool,
    cache: tuple[KeyValues, KeyValues, int] | None,
) -> Float[Tensor, "batch new_seq d_model"]:
    """Multi-head (or grouped-query) causal self-attention; writes new keys/values to `cache`."""
    batch, pos, _ = x.shape
    h, kv, d = weights.n_heads, weights.n_kv_heads, weights.d_head
    qkv = _linear(x, layer.w_qkv, layer.b_qkv, layer.lora.get("qkv"))
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
    q = q.view(batch, pos, h, d).transpose(1, 2)
    k = k.view(batch, pos, kv, d).transpose(1, 2)
    v = v.view(batch, pos, kv, d).transpose(1, 2)
    if rotary is not None:
        q = _rotate(q, *rotary, weights.rotary_adjacent_pairs)
        k = _rotate(k, *rotary, weights.rotary_adjacent_pairs)
    if cache is not None:  # decoding: append to the preallocated cache, attend to all of it
        k_cache, v_cache, start = cache
        k_cache[:, :, start : start + pos] = k
        v_cache[:, :, start : start + pos] = v
        k, v = k_cache[:, :, : start + pos], v_cache[:, :, : start + pos]
    z = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal,
        scale=1.0 / weights.attn_scale, enable_gqa=kv != h,
    )
    return _linear(z.transpose(1, 2).reshape(batch, pos, h * d), layer.w_o, layer.b_o,
                   layer.lora.get("o"))


def _linear(
    x: Float[Tensor, "*batch d_in"], weight: Float[Tensor, "d_out d_in"],
    bias: Float[Tensor, " d_out"] | None, low_rank: LowRank | None = None,
) -> Float[Tensor, "*batch d_out"]:
    """F.linear, plus a LoRA term when there is one."""
    out = F.linear(x, weight, bias)
    return out if low_rank is None else out + F.linear(F.linear(x, low_rank[0]), low_rank[1])


def _mlp(
    x: Float[Tensor, "batch new_seq d_model"], layer: LayerWeights, weights: FastWeights
) -> Float[Tensor, "batch new_seq d_model"]:
    act = _ACTIVATIONS[weights.act_fn]
    lora = layer.lora
    if layer.w_gate is not None:  # TransformerLens adds b_in after the product
        hidden = (act(_linear(x, layer.w_gate, None, lora.get("gate")))
                  * _linear(x, layer.w_in, None, lora.get("in")) + layer.b_in)
    else:
        hidden = act(_linear(x, layer.w_in, layer.b_in, lora.get("in")))
    return _linear(hidden, layer.w_out, layer.b_out, lora.get("out"))


# ---------------------------------------------------------------- whole forward passes


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
    """
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
    if residual is None:
        residual = _embed(weights, tokens, position_ids)
    rotary = _get_rotary(weights, position_ids)
    first, stop, _ = layers.indices(len(weights.layers))
    for i in range(first, stop):
        layer, layer_cache = weights.layers[i], None if cache is None else (*cache[i], start)
        normed = _normalize(residual, weights, layer.ln1_w, layer.ln1_b)
        residual = residual + _attention(
            normed, layer, weights, rotary, attn_mask, causal, layer_cache
        )
        normed = _normalize(residual, weights, layer.ln2_w, layer.ln2_b)
        residual = residual + _mlp(normed, layer, weights)
    if stop < len(weights.layers):
        return residual
    # Before the final norm's gain and bias: what ln_final.hook_normalized holds.
    return _normalize(residual, weights, None, None)


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

