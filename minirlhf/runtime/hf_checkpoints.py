"""Hugging Face checkpoints as HookedTransformers: configs translated, weights converted.

Part of stage 0, below `runtime.loading`, whose `load_policy` sends a folder here and whose
SmolLM2 loader builds its model with `get_llama_cfg` and `build_model`. A GPT-2 or Llama folder
written by `save_pretrained` goes through TransformerLens's own `convert_*_weights` with a config
built from the Hugging Face config, and loads unfolded (no LayerNorm folding or centring), so
its log-probs match the Hugging Face model's within 1e-4. Export (`runtime.export`) undoes it.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_gpt2_weights,
    convert_llama_weights,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from minirlhf.runtime.tied import tie_unembedding


def load_hf_folder(path: str | Path, device: str | torch.device = "cpu") -> HookedTransformer:
    """A Hugging Face GPT-2 or Llama-architecture checkpoint in a local folder, with its tokenizer.

    The folder is what `model.save_pretrained(folder)` and `tokenizer.save_pretrained(folder)`
    write. BOS follows the usual convention: GPT-2 models get `<|endoftext|>` prepended (as
    TransformerLens does for "gpt2"); Llama models get BOS only if their own tokenizer adds it.
    """
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: save the model with save_pretrained."
        )
    hf_config = AutoConfig.from_pretrained(folder)
    if hf_config.model_type not in HF_LOADERS:
        raise ValueError(
            f"{folder} holds a {hf_config.model_type!r} model; minirlhf converts GPT-2 and Llama."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{folder} needs its tokenizer: tokenizer.save_pretrained."
        ) from error
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    get_cfg, convert_weights = HF_LOADERS[hf_config.model_type]
    cfg = get_cfg(hf_config, device, tokenizer)
    with torch.no_grad():
        state_dict = convert_weights(hf_model, cfg)
    return build_model(cfg, state_dict, tokenizer, tied=hf_config.tie_word_embeddings)


def get_gpt2_cfg(
    hf_config: PretrainedConfig, device: str | torch.device, tokenizer: PreTrainedTokenizerBase
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of a Hugging Face GPT2Config (as TransformerLens builds it)."""
    return HookedTransformerConfig(
        d_model=hf_config.n_embd,
        d_head=hf_config.n_embd // hf_config.n_head,
        n_heads=hf_config.n_head,
        d_mlp=hf_config.n_inner or 4 * hf_config.n_embd,
        n_layers=hf_config.n_layer,
        n_ctx=hf_config.n_positions,
        eps=hf_config.layer_norm_epsilon,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.activation_function,
        use_attn_scale=hf_config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=hf_config.scale_attn_by_inverse_layer_idx,
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        init_weights=False,  # every weight is overwritten by the checkpoint
        device=str(device),
    )


def get_llama_cfg_for_folder(
    hf_config: PretrainedConfig, device: str | torch.device, tokenizer: PreTrainedTokenizerBase
) -> HookedTransformerConfig:
    """Llama's config for a folder: prepend BOS only if the model's own tokenizer does."""
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError("convert_llama_weights drops biases: this model has some.")
    prepend_bos = len(tokenizer.encode("")) > 0
    return get_llama_cfg(hf_config, device, torch.float32, prepend_bos=prepend_bos)


def get_llama_cfg(
    hf_config: PretrainedConfig, device: str | torch.device, dtype: torch.dtype, prepend_bos: bool
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of a Hugging Face LlamaConfig (SmolLM2's too)."""
    d_head = (
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )
    n_kv_heads = hf_config.num_key_value_heads or hf_config.num_attention_heads
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        # TransformerLens switches to grouped-query attention whenever this is not None.
        n_key_value_heads=n_kv_heads if n_kv_heads != hf_config.num_attention_heads else None,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=get_rope_theta(hf_config),
        # Llama rotates the two halves of each head against each other, not adjacent pairs (GPT-J).
        rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=prepend_bos,
        init_weights=False,  # every weight is overwritten by the checkpoint
        device=str(device),
        dtype=dtype,
    )


def get_rope_theta(hf_config: PretrainedConfig) -> float:
    """RoPE's base frequency; scaled RoPE variants (Llama 3's, YaRN) are refused, not ignored."""
    # transformers 5 keeps it in rope_parameters, transformers 4 in rope_theta (+ rope_scaling).
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    rope = rope or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"RoPE type {rope_type!r} is not supported by minirlhf's loader.")
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


HF_LOADERS: dict[str, tuple[Callable, Callable]] = {
    "gpt2": (get_gpt2_cfg, convert_gpt2_weights),
    "llama": (get_llama_cfg_for_folder, convert_llama_weights),
}
"""Hugging Face model_type -> (config builder, TransformerLens weight conversion)."""


def build_model(
    cfg: HookedTransformerConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    tied: bool = False,
) -> HookedTransformer:
    """A HookedTransformer holding converted weights, unfolded, in eval mode.

    Args:
        tied: the checkpoint's config ties its embeddings (`tie_word_embeddings`): when its W_U
            equals W_E.T, the model keeps one matrix for both (`runtime.tied`), as the checkpoint
            does; a checkpoint whose two differ despite its config keeps both.
    """
    # TransformerLens re-loads the tokenizer from tokenizer.name_or_path, so that must be a folder.
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    # GPT-2 has no unembedding bias, so convert_gpt2_weights leaves it out; init_weights=False
    # would leave it uninitialised memory.
    state_dict.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab_out, dtype=cfg.dtype))
    # Buffers (rotary tables, masks) come from the constructor; the state dict holds the weights.
    result = model.load_state_dict(state_dict, strict=False)
    missing = set(result.missing_keys) - {name for name, _ in model.named_buffers()}
    assert not missing and not result.unexpected_keys, (
        f"weights {missing=} {result.unexpected_keys=}"
    )
    if tied and torch.equal(model.unembed.W_U.detach(), model.embed.W_E.detach().T):
        tie_unembedding(model)
    model.eval()
    return model
