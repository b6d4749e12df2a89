"""The pieces of one transformer block on the fast path: norm, rotary, attention, MLP.

Part of the model layer (stages 1-2), below `runtime.fast_path`, whose `forward` runs these
blocks in turn. Each piece computes exactly what its TransformerLens counterpart computes, from
the weights `runtime.fast_weights` lays out, with `F.linear` and `scaled_dot_product_attention`
instead of per-head einsums; LoRA terms, when kept apart for training, are added by `linear`.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from minirlhf.runtime.fast_weights import FastWeights, LayerWeights, LowRank

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}
KeyValues = Float[Tensor, "batch kv_head max_len d_head"]
"""One layer's cached keys (or values), preallocated for `max_len` positions."""


def normalize(
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


def rotate(
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


def attention(
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
    qkv = linear(x, layer.w_qkv, layer.b_qkv, layer.lora.get("qkv"))
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
    q = q.view(batch, pos, h, d).transpose(1, 2)
    k = k.view(batch, pos, kv, d).transpose(1, 2)
    v = v.view(batch, pos, kv, d).transpose(1, 2)
    if rotary is not None:
        q = rotate(q, *rotary, weights.rotary_adjacent_pairs)
        k = rotate(k, *rotary, weights.rotary_adjacent_pairs)
    if cache is not None:  # decoding: append to the preallocated cache, attend to all of it
        k_cache, v_cache, start = cache
        k_cache[:, :, start : start + pos] = k
        v_cache[:, :, start : start + pos] = v
        k, v = k_cache[:, :, : start + pos], v_cache[:, :, : start + pos]
    z = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal,
        scale=1.0 / weights.attn_scale, enable_gqa=kv != h,
    )
    return linear(z.transpose(1, 2).reshape(batch, pos, h * d), layer.w_o, layer.b_o,
                  layer.lora.get("o"))


def linear(
    x: Float[Tensor, "*batch d_in"], weight: Float[Tensor, "d_out d_in"],
    bias: Float[Tensor, " d_out"] | None, low_rank: LowRank | None = None,
) -> Float[Tensor, "*batch d_out"]:
    """F.linear, plus a LoRA term when there is one."""
    out = F.linear(x, weight, bias)
    return out if low_rank is None else out + F.linear(F.linear(x, low_rank[0]), low_rank[1])


def mlp(
    x: Float[Tensor, "batch new_seq d_model"], layer: LayerWeights, weights: FastWeights
) -> Float[Tensor, "batch new_seq d_model"]:
    act = ACTIVATIONS[weights.act_fn]
    lora = layer.lora
    if layer.w_gate is not None:  # TransformerLens adds b_in after the product
        hidden = (act(linear(x, layer.w_gate, None, lora.get("gate")))
                  * linear(x, layer.w_in, None, lora.get("in")) + layer.b_in)
    else:
        hidden = act(linear(x, layer.w_in, layer.b_in, lora.get("in")))
    return linear(hidden, layer.w_out, layer.b_out, lora.get("out"))


def run_block(
    residual: Float[Tensor, "batch new_seq d_model"],
    layer: LayerWeights,
    weights: FastWeights,
    rotary: tuple[Float[Tensor, "batch 1 new_seq rotary_dim"],
                  Float[Tensor, "batch 1 new_seq rotary_dim"]] | None,
    attn_mask: Bool[Tensor, "batch 1 new_seq key"] | None,
    causal: bool,
    cache: tuple[KeyValues, KeyValues, int] | None,
) -> Float[Tensor, "batch new_seq d_model"]:
    """One block, pre-norm: attention, then the MLP, each added to the residual stream."""
    normed = normalize(residual, weights, layer.ln1_w, layer.ln1_b)
    residual = residual + attention(normed, layer, weights, rotary, attn_mask, causal, cache)
    normed = normalize(residual, weights, layer.ln2_w, layer.ln2_b)
    return residual + mlp(normed, layer, weights)
