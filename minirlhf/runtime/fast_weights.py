"""The fast path's weights: a HookedTransformer's weights in the layout `F.linear` reads.

Part of the model layer (stages 1-2), below `runtime.fast_path`, whose `get_fast_weights` builds
these containers once per rollout (or per training step). TransformerLens keeps attention weights
per head (`W_Q: [n_heads, d_model, d_head]`); here each block's Q, K and V become one fused
[out_features, in_features] matrix, and LoRA adapters (`runtime.lora`) are either merged into the
matrices (no gradient wanted) or kept beside them as low-rank terms (training).
"""

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.runtime.lora import LoraAdapters

LowRank = tuple[Float[Tensor, "rank d_in"], Float[Tensor, "d_out rank"]]
"""A LoRA term in `F.linear` layout: x -> (x @ down.T) @ up.T, the scale folded into `up`."""


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
    shifts: dict = field(default_factory=dict)
    """Per block, the `runtime.steering.ResidualShift` hooks added after it (usually none)."""



def heads_to_linear(weight: Float[Tensor, "head d_model d_head"]) -> Float[Tensor, "hd d_model"]:
    """[n_heads, d_model, d_head] (TransformerLens) -> [n_heads * d_head, d_model] (F.linear)."""
    return weight.permute(0, 2, 1).reshape(-1, weight.shape[1])


def get_layer_weights(
    block, gated: bool, adapters: LoraAdapters | None, layer: int
) -> LayerWeights:
    """One block's weights laid out for `F.linear`, with its LoRA adapters (`apply_lora`)."""
    attn, mlp = block.attn, block.mlp
    # Grouped-query attention keeps the unrepeated K and V heads in _W_K / _W_V.
    matrices = {
        "q": heads_to_linear(attn.W_Q),
        "k": heads_to_linear(getattr(attn, "_W_K", attn.W_K)),
        "v": heads_to_linear(getattr(attn, "_W_V", attn.W_V)),
        "o": attn.W_O.reshape(-1, attn.W_O.shape[-1]).T,  # x @ W_O without a copy
        "in": mlp.W_in.T, "gate": mlp.W_gate.T if gated else None, "out": mlp.W_out.T,
    }
    matrices, lora = apply_lora(matrices, adapters, layer)
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


def apply_lora(
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

