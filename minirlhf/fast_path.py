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
models `minirlhf.loading` builds.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

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


def has_hooks(model: HookedTransformer) -> bool:
    """Whether any hook is attached to the model's hook points (`model.add_hook(...)`)."""
    return any(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
               for point in model.hook_dict.values())


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
    layers: list[LayerWeights]
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


def _layer_weights(block, gated: bool) -> LayerWeights:
    attn, mlp = block.attn, block.mlp
    # Grouped-query attention keeps the unrepeated K and V heads in _W_K / _W_V.
    w_k = getattr(attn, "_W_K", attn.W_K)
    w_v = getattr(attn, "_W_V", attn.W_V)
    b_k = getattr(attn, "_b_K", attn.b_K)
    b_v = getattr(attn, "_b_V", attn.b_V)
    w_qkv = torch.cat([_heads_to_linear(w) for w in (attn.W_Q, w_k, w_v)])
    b_qkv = torch.cat([attn.b_Q.flatten(), b_k.flatten(), b_v.flatten()])
    w_o = attn.W_O.reshape(-1, attn.W_O.shape[-1]).T  # x @ W_O without a copy
    return LayerWeights(
        ln1_w=getattr(block.ln1, "w", None), ln1_b=getattr(block.ln1, "b", None),
        w_qkv=w_qkv, b_qkv=b_qkv, w_o=w_o, b_o=attn.b_O,
        ln2_w=getattr(block.ln2, "w", None), ln2_b=getattr(block.ln2, "b", None),
        w_in=mlp.W_in.T, b_in=mlp.b_in, w_gate=mlp.W_gate.T if gated else None,
        w_out=mlp.W_out.T, b_out=mlp.b_out,
    )


def get_output_weights(model: HookedTransformer) -> OutputWeights:
    """The weights `unembed` needs, read in place (no copy: cheap to call every time)."""
    return OutputWeights(
        ln_final_w=getattr(model.ln_final, "w", None),
        ln_final_b=getattr(model.ln_final, "b", None),
        unembed=model.unembed.W_U.T,
        unembed_b=model.unembed.b_U,
    )


def get_fast_weights(model: HookedTransformer) -> FastWeights:
    """Lay out the model's weights for `forward` (differentiable: call it under `no_grad` to lay
    them out once for many inference calls, or with gradients on for a training step)."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise NotImplementedError(
            f"minirlhf's fast path does not support {reason}: run the HookedTransformer's own "
            "forward instead (models and the sampler take fast_path=False)."
        )
    cfg = model.cfg
    rotary = cfg.positional_embedding_type == "rotary"
    attn = model.blocks[0].attn
    return FastWeights(
        embed=model.embed.W_E,
        pos_embed=None if rotary else model.pos_embed.W_pos,
        layers=[_layer_weights(block, cfg.gated_mlp) for block in model.blocks],
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
    qkv = F.linear(x, layer.w_qkv, layer.b_qkv)
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
    return F.linear(z.transpose(1, 2).reshape(batch, pos, h * d), layer.w_o, layer.b_o)


def _mlp(
    x: Float[Tensor, "batch new_seq d_model"], layer: LayerWeights, weights: FastWeights
) -> Float[Tensor, "batch new_seq d_model"]:
    act = _ACTIVATIONS[weights.act_fn]
    if layer.w_gate is not None:  # TransformerLens adds b_in after the product
        hidden = act(F.linear(x, layer.w_gate)) * F.linear(x, layer.w_in) + layer.b_in
    else:
        hidden = act(F.linear(x, layer.w_in, layer.b_in))
    return F.linear(hidden, layer.w_out, layer.b_out)


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
) -> Float[Tensor, "batch new_seq d_model"]:
    """The final normalised residual stream, as `ln_final.hook_normalized` holds it: before the
    final norm's gain and bias (what the value head reads; `unembed` applies the gain and bias).

    Args:
        tokens: the tokens at positions `start .. start + new_seq` of the sequence.
        attention_mask: 1 for real tokens, 0 for left padding, for positions `0 .. start + new_seq`
            (None: no padding, plain causal attention).
        cache: per layer, preallocated (keys, values) of shape [batch, kv_heads, max_len, d_head];
            positions before `start` must already hold the earlier tokens' keys and values.
    """
    batch, pos = tokens.shape
    residual = F.embedding(tokens, weights.embed)
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
    if weights.pos_embed is not None:
        residual = residual + weights.pos_embed[position_ids]
    rotary = None
    if weights.rotary_cos is not None:
        if int(position_ids.max()) >= weights.rotary_cos.shape[0]:
            raise ValueError(
                f"Position {int(position_ids.max())} is past the model's rotary table "
                f"({weights.rotary_cos.shape[0]} positions): use a shorter prompt or gen_len."
            )
        rotary = (weights.rotary_cos[position_ids][:, None],
                  weights.rotary_sin[position_ids][:, None])
    for i, layer in enumerate(weights.layers):
        layer_cache = None if cache is None else (*cache[i], start)
        normed = _normalize(residual, weights, layer.ln1_w, layer.ln1_b)
        residual = residual + _attention(
            normed, layer, weights, rotary, attn_mask, causal, layer_cache
        )
        normed = _normalize(residual, weights, layer.ln2_w, layer.ln2_b)
        residual = residual + _mlp(normed, layer, weights)
    # Before the final norm's gain and bias: what ln_final.hook_normalized holds.
    return _normalize(residual, weights, None, None)


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

