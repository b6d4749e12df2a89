"""Export's refusals: which Hugging Face architecture computes what a HookedTransformer computes.

Part of the export (`runtime.export`, after training). Before any weight is mapped,
`get_architecture` reads the TransformerLens config and names every field that neither GPT-2
nor Llama can hold (soft-capping, local attention, a non-standard attention scale, ...), so a
user learns at once what to change instead of getting a folder with other log-probs.
`check_unembed_bias` decides whether a Llama export may drop `unembed.b_U` (Llama has no output
bias): only when that moves no log-prob, or when the user asked.
"""

import math

from jaxtyping import Float
from torch import Tensor

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "gelu_fast", "relu", "silu")
"""TransformerLens activation names that mean the same function in transformers' ACT2FN."""

UNEMBED_BIAS_TOLERANCE = 1e-6
"""The largest spread (max - min) of `unembed.b_U` dropped without being asked: dropping it
changes no log-prob by more than its spread."""


class ExportError(ValueError):
    """A model or option the export cannot honour; the message says what to change."""


# ---------------------------------------------------------------- which architecture


def get_architecture(cfg) -> str:
    """"gpt2" or "llama": the Hugging Face architecture that computes what `cfg` computes.

    Raises:
        ExportError: naming every config field that neither architecture supports.
    """
    if cfg.positional_embedding_type == "standard":
        architecture, checks = "gpt2", _gpt2_checks(cfg)
    elif cfg.positional_embedding_type == "rotary":
        architecture, checks = "llama", _llama_checks(cfg)
    else:
        raise ExportError(
            f"cfg.positional_embedding_type = {cfg.positional_embedding_type!r}: minirlhf exports "
            "GPT-2-style models ('standard' learned positions) and Llama-style ones ('rotary').")
    failed = [what for ok, what in _common_checks(cfg) + checks if not ok]
    if failed:
        raise ExportError(f"This model cannot be exported as a {architecture} model: "
                          + "; ".join(failed) + ".")
    return architecture


def _common_checks(cfg) -> list[tuple[bool, str]]:
    """(supported, what to change) for the fields both architectures need the same."""
    return [
        (cfg.act_fn in _ACTIVATIONS, f"cfg.act_fn = {cfg.act_fn!r} (needs one of {_ACTIVATIONS})"),
        (cfg.d_vocab_out == cfg.d_vocab, f"cfg.d_vocab_out = {cfg.d_vocab_out} differs from "
         f"cfg.d_vocab = {cfg.d_vocab}"),
        (not cfg.parallel_attn_mlp, "cfg.parallel_attn_mlp = True"),
        (not cfg.attn_only, "cfg.attn_only = True"),
        (not cfg.post_embedding_ln, "cfg.post_embedding_ln = True"),
        (not cfg.use_normalization_before_and_after, "cfg.use_normalization_before_and_after"),
        (not cfg.use_qk_norm, "cfg.use_qk_norm = True"),
        (cfg.clip_qkv is None, f"cfg.clip_qkv = {cfg.clip_qkv}"),
        (cfg.attention_dir == "causal", f"cfg.attention_dir = {cfg.attention_dir!r}"),
        (cfg.window_size is None and not cfg.use_local_attn, "local attention (cfg.window_size)"),
        (cfg.num_experts is None, "cfg.num_experts (mixture of experts)"),
        (cfg.attn_scores_soft_cap <= 0 and cfg.output_logits_soft_cap <= 0,
         "soft-capping (cfg.attn_scores_soft_cap, cfg.output_logits_soft_cap)"),
        (not cfg.use_logn_attn, "cfg.use_logn_attn = True"),
        (not getattr(cfg, "use_attention_sinks", False), "cfg.use_attention_sinks = True"),
        (not cfg.use_attn_scale or math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head)),
         f"cfg.attn_scale = {cfg.attn_scale} (needs sqrt(d_head) = {math.sqrt(cfg.d_head):g})"),
    ]


def _gpt2_checks(cfg) -> list[tuple[bool, str]]:
    return [
        (cfg.normalization_type in ("LN", "LNPre"),
         f"cfg.normalization_type = {cfg.normalization_type!r} (GPT-2 needs 'LN' or 'LNPre')"),
        (not cfg.final_rms, "cfg.final_rms = True (GPT-2's final norm is a LayerNorm)"),
        (not cfg.gated_mlp, "cfg.gated_mlp = True (GPT-2's MLP is not gated)"),
        (cfg.n_key_value_heads is None, "cfg.n_key_value_heads is set (GPT-2 has no "
         "grouped-query attention)"),
        (cfg.n_heads * cfg.d_head == cfg.d_model, f"cfg.n_heads * cfg.d_head = "
         f"{cfg.n_heads * cfg.d_head} differs from cfg.d_model = {cfg.d_model}"),
    ]


def _llama_checks(cfg) -> list[tuple[bool, str]]:
    return [
        (cfg.normalization_type in ("RMS", "RMSPre"),
         f"cfg.normalization_type = {cfg.normalization_type!r} (Llama needs 'RMS' or 'RMSPre')"),
        (cfg.gated_mlp, "cfg.gated_mlp = False (Llama's MLP is gated)"),
        (cfg.use_attn_scale, "cfg.use_attn_scale = False (Llama divides by sqrt(d_head))"),
        (cfg.rotary_dim == cfg.d_head, f"cfg.rotary_dim = {cfg.rotary_dim} (Llama rotates all "
         f"d_head = {cfg.d_head} dimensions)"),
        (not (cfg.use_NTK_by_parts_rope or cfg.use_yarn_rope or cfg.use_dynamic_ntk_rope),
         "scaled RoPE (cfg.use_NTK_by_parts_rope, use_yarn_rope, use_dynamic_ntk_rope)"),
        (not cfg.scale_attn_by_inverse_layer_idx, "cfg.scale_attn_by_inverse_layer_idx = True"),
    ]


def check_unembed_bias(b_U: Float[Tensor, " d_vocab"], drop: bool) -> float:
    """How much dropping `unembed.b_U` from a Llama export changes log-probs at most: its
    spread, max - min.

    Adding b to every logit changes log p_i by b_i - (logsumexp(z + b) - logsumexp(z)), and the
    bracket lies between min(b) and max(b); so a constant b_U changes nothing.

    Raises:
        ExportError: the spread exceeds `UNEMBED_BIAS_TOLERANCE` and `drop` is False.
    """
    spread = float(b_U.max() - b_U.min())
    if spread > UNEMBED_BIAS_TOLERANCE and not drop:
        raise ExportError(
            f"unembed.b_U differs between tokens (spread {spread:.3g}), and Llama has no output "
            f"bias: dropping it would change log-probs by up to {spread:.3g}. Pass "
            "drop_unembed_bias=True (--drop-unembed-bias) to export without it.")
    return spread

