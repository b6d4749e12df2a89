"""Export: a HookedTransformer policy as a Hugging Face model folder that transformers loads.

After training, the pipeline in reverse of stage 0. `runtime.loading` turns Hugging Face GPT-2
and Llama checkpoints into TransformerLens weights with TransformerLens's `convert_*_weights`;
this module undoes that conversion, so a trained policy can leave minirlhf for any tool that reads
`AutoModelForCausalLM.from_pretrained(folder)`:

- GPT-2 shapes (learned positions, LayerNorm, plain MLP) become a `GPT2LMHeadModel`: its `Conv1D`
  layers store weights as [in, out] (`y = x @ W + b`), and one `c_attn` holds Q, K and V side by
  side, each laid out head after head.
- Llama shapes (rotary positions, RMSNorm, gated MLP, grouped-query attention) become a
  `LlamaForCausalLM`: `nn.Linear` layers store [out, in].

What TransformerLens may have changed on loading keeps the same log-probs:

- Folded normalisation (`LNPre`, `RMSPre`: the scales live in the next weights): the exported
  norms get weight 1 and bias 0, which computes exactly what the folded norm computes.
- Centred writing weights and unembedding: exported as they are; the norms remove the first and
  the second shifts every logit of a position by the same amount (log-softmax unchanged).
- Biases trained onto a Llama model (TransformerLens gives every layer one): exported through
  the config's `attention_bias` / `mlp_bias`. TransformerLens adds a gated MLP's `b_in` after the
  gate, where Llama has none, so it is folded into `down_proj`'s bias: (h + b_in) W_out + b_out.
- GPT-J-style rotary (`rotary_adjacent_pairs`): Q and K dimensions are reordered into Llama's
  half-and-half pairing, which leaves every q.k unchanged.

Neither architecture has an output bias (`unembed.b_U`, which training moves). GPT-2 exports
keep it exactly in the final LayerNorm (`carry_unembed_bias_in_norm`); Llama exports drop it when
it is the same for every token (no probability changes), and otherwise refuse unless told to
drop it (`check_unembed_bias`). Which configs export refuses, and why, is
`runtime.export_checks`.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from minirlhf.runtime.export_checks import (
    UNEMBED_BIAS_TOLERANCE,
    ExportError,
    check_unembed_bias,
    get_architecture,
)
from minirlhf.runtime.lora import get_adapters
from minirlhf.runtime.tied import is_tied

StateDict = dict[str, Tensor]


# ---------------------------------------------------------------- shared pieces


def get_norm_weights(state: StateDict, tl_name: str, hf_name: str, d_model: int,
                     with_bias: bool) -> StateDict:
    """A norm's weight (and bias); a folded norm (no `.w` in the state) gets 1 (and 0)."""
    like = state["embed.W_E"]
    weights = {f"{hf_name}.weight": state.get(f"{tl_name}.w", like.new_ones(d_model))}
    if with_bias:
        weights[f"{hf_name}.bias"] = state.get(f"{tl_name}.b", like.new_zeros(d_model))
    return weights


def heads_to_columns(
    weight: Float[Tensor, "head d_model d_head"],
) -> Float[Tensor, "d_model hd"]:
    """Per-head input weights as one [in, out] matrix, head after head (`Conv1D`'s layout)."""
    return rearrange(weight, "head d_model d_head -> d_model (head d_head)")


def heads_to_rows(
    weight: Float[Tensor, "head d_head d_model"],
) -> Float[Tensor, "hd d_model"]:
    """Per-head output weights (W_O) as one [in, out] matrix, head after head."""
    return rearrange(weight, "head d_head d_model -> (head d_head) d_model")


def flatten_heads(bias: Float[Tensor, "head d_head"]) -> Float[Tensor, " hd"]:
    """Per-head biases side by side, head after head."""
    return rearrange(bias, "head d_head -> (head d_head)")


# ---------------------------------------------------------------- GPT-2


def get_gpt2_weights(state: StateDict, cfg, carry_unembed_bias: bool) -> StateDict:
    """`GPT2LMHeadModel`'s state dict from a GPT-2-shaped HookedTransformer's.

    Args:
        carry_unembed_bias: keep `unembed.b_U` exactly, in the final LayerNorm
            (`carry_unembed_bias_in_norm`); otherwise it is dropped (the caller found it the
            same for every token).
    """
    weights = {"transformer.wte.weight": state["embed.W_E"],
               "transformer.wpe.weight": state["pos_embed.W_pos"]}
    for layer in range(cfg.n_layers):
        weights |= get_gpt2_block(state, cfg, layer)
    ln_f = get_norm_weights(state, "ln_final", "transformer.ln_f", cfg.d_model, True)
    W_U = state["unembed.W_U"]
    if carry_unembed_bias:
        ln_f, W_U = carry_unembed_bias_in_norm(ln_f, W_U, state["unembed.b_U"])
    # GPT-2 ties lm_head to wte; a trained or centred W_U no longer equals W_E.T, so it is kept.
    return weights | ln_f | {"lm_head.weight": W_U.T}


def carry_unembed_bias_in_norm(
    ln_f: StateDict, W_U: Float[Tensor, "d_model d_vocab"], b_U: Float[Tensor, " d_vocab"]
) -> tuple[StateDict, Float[Tensor, "d_model d_vocab"]]:
    """GPT-2's final LayerNorm and unembedding rewritten to compute logits n w W_U + b W_U + b_U
    exactly, although `lm_head` has no bias (n: the normalised vector, w, b: the norm's scale and
    bias).

    LayerNorm's n sums to zero, so its last coordinate is minus the sum of the others and needs
    no row of its own: n_last w_last W_U[last] = -sum_{j < last} n_j w_last W_U[last]. The other
    rows take it in (W_U[j] w_j - W_U[last] w_last), which frees the last coordinate to be the
    constant 1 (weight 0, bias 1) with the constant part of the logits, b W_U + b_U, as its row.
    TransformerLens puts a folded final LayerNorm's bias into b_U, and training moves b_U, so
    GPT-2 exports need this; Llama's RMSNorm has no such coordinate.
    """
    w, b = ln_f["transformer.ln_f.weight"], ln_f["transformer.ln_f.bias"]
    rows = W_U * w[:, None] - w[-1] * W_U[-1]
    rows[-1] = b @ W_U + b_U
    weight, bias = torch.ones_like(w), torch.zeros_like(b)
    weight[-1], bias[-1] = 0.0, 1.0
    return {"transformer.ln_f.weight": weight, "transformer.ln_f.bias": bias}, rows


def get_gpt2_block(state: StateDict, cfg, layer: int) -> StateDict:
    """One block. `Conv1D` computes x @ W + b, so TransformerLens's [d_model, ...] weights keep
    their orientation; Q, K and V sit side by side in `c_attn`."""
    tl, hf = f"blocks.{layer}.", f"transformer.h.{layer}."
    attn = {name: state[f"{tl}attn.{name}"] for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")}
    weights = {
        f"{hf}attn.c_attn.weight": torch.cat(
            [heads_to_columns(attn[f"W_{x}"]) for x in "QKV"], dim=1),
        f"{hf}attn.c_attn.bias": torch.cat([flatten_heads(attn[f"b_{x}"]) for x in "QKV"]),
        f"{hf}attn.c_proj.weight": heads_to_rows(state[f"{tl}attn.W_O"]),
        f"{hf}attn.c_proj.bias": state[f"{tl}attn.b_O"],
        f"{hf}mlp.c_fc.weight": state[f"{tl}mlp.W_in"],
        f"{hf}mlp.c_fc.bias": state[f"{tl}mlp.b_in"],
        f"{hf}mlp.c_proj.weight": state[f"{tl}mlp.W_out"],
        f"{hf}mlp.c_proj.bias": state[f"{tl}mlp.b_out"],
    }
    for tl_norm, hf_norm in (("ln1", "ln_1"), ("ln2", "ln_2")):
        weights |= get_norm_weights(state, tl + tl_norm, hf + hf_norm, cfg.d_model, True)
    return weights


def get_gpt2_config(cfg, token_ids: dict) -> GPT2Config:
    return GPT2Config(
        vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function=cfg.act_fn,
        layer_norm_epsilon=cfg.eps, scale_attn_weights=cfg.use_attn_scale,
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        # No dropout: the exported model computes what the policy computed.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, **token_ids,
    )


# ---------------------------------------------------------------- Llama


def get_llama_weights(state: StateDict, cfg) -> StateDict:
    """`LlamaForCausalLM`'s state dict from a Llama-shaped HookedTransformer's."""
    weights = {"model.embed_tokens.weight": state["embed.W_E"]}
    for layer in range(cfg.n_layers):
        weights |= get_llama_attention(state, cfg, layer) | get_llama_mlp(state, cfg, layer)
        for tl_norm, hf_norm in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            weights |= get_norm_weights(state, f"blocks.{layer}.{tl_norm}",
                                        f"model.layers.{layer}.{hf_norm}", cfg.d_model, False)
    weights |= get_norm_weights(state, "ln_final", "model.norm", cfg.d_model, False)
    weights["lm_head.weight"] = state["unembed.W_U"].T
    return weights


def get_kv_weights(state: StateDict, cfg, layer: int, name: str) -> tuple[Tensor, Tensor]:
    """W_K or W_V and its bias, one per key-value head: grouped-query attention keeps them as
    `_W_K`, `_b_K` (TransformerLens repeats each head for its group of query heads, like
    transformers' `repeat_kv`)."""
    tl = f"blocks.{layer}.attn."
    if cfg.n_key_value_heads is not None:
        return state[f"{tl}_W_{name}"], state[f"{tl}_b_{name}"]
    return state[f"{tl}W_{name}"], state[f"{tl}b_{name}"]


def get_rotary_order(cfg) -> Tensor:
    """The order of each head's Q and K dimensions in Llama's rotary pairing.

    Llama rotates dimension i with i + d_head/2; GPT-J-style rotary (`rotary_adjacent_pairs`)
    rotates 2i with 2i + 1 at the same frequency. Putting the even dimensions first, then the odd
    ones, moves each GPT-J pair to a Llama pair; Q and K move alike, so every q.k is unchanged.
    """
    if not cfg.rotary_adjacent_pairs:
        return torch.arange(cfg.d_head)
    return torch.cat([torch.arange(0, cfg.d_head, 2), torch.arange(1, cfg.d_head, 2)])


def get_llama_attention(state: StateDict, cfg, layer: int) -> StateDict:
    """Q, K, V, O projections; `nn.Linear` stores [out, in], so each weight is transposed."""
    tl, hf = f"blocks.{layer}.attn.", f"model.layers.{layer}.self_attn."
    order = get_rotary_order(cfg)
    projections = {"q": (state[f"{tl}W_Q"][..., order], state[f"{tl}b_Q"][..., order])}
    W_K, b_K = get_kv_weights(state, cfg, layer, "K")
    projections["k"] = (W_K[..., order], b_K[..., order])
    projections["v"] = get_kv_weights(state, cfg, layer, "V")
    weights = {f"{hf}o_proj.weight": heads_to_rows(state[f"{tl}W_O"]).T,
               f"{hf}o_proj.bias": state[f"{tl}b_O"]}
    for x, (weight, bias) in projections.items():
        weights[f"{hf}{x}_proj.weight"] = heads_to_columns(weight).T
        weights[f"{hf}{x}_proj.bias"] = flatten_heads(bias)
    return weights


def get_llama_mlp(state: StateDict, cfg, layer: int) -> StateDict:
    """gate, up, down projections. TransformerLens computes (act(x W_gate) * (x W_in) + b_in)
    W_out + b_out: its b_in comes after the gate, so it goes into down_proj's bias."""
    tl, hf = f"blocks.{layer}.mlp.", f"model.layers.{layer}.mlp."
    W_out = state[f"{tl}W_out"]
    return {
        f"{hf}gate_proj.weight": state[f"{tl}W_gate"].T,
        f"{hf}gate_proj.bias": W_out.new_zeros(cfg.d_mlp),
        f"{hf}up_proj.weight": state[f"{tl}W_in"].T,
        f"{hf}up_proj.bias": W_out.new_zeros(cfg.d_mlp),
        f"{hf}down_proj.weight": W_out.T,
        f"{hf}down_proj.bias": state[f"{tl}b_in"] @ W_out + state[f"{tl}b_out"],
    }


def drop_zero_biases(weights: StateDict) -> tuple[StateDict, bool, bool]:
    """Leave out the attention and MLP biases when all are zero (a Llama without biases, as
    loaded); returns the weights and whether attention and MLP biases are kept."""
    def all_zero(part: str) -> bool:
        return all(not value.any() for name, value in weights.items()
                   if f".{part}." in name and name.endswith(".bias"))

    keep_attention, keep_mlp = not all_zero("self_attn"), not all_zero("mlp")
    kept = {name: value for name, value in weights.items() if not name.endswith(".bias")
            or (keep_attention and ".self_attn." in name) or (keep_mlp and ".mlp." in name)}
    return kept, keep_attention, keep_mlp


def get_llama_config(cfg, token_ids: dict, attention_bias: bool, mlp_bias: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads or cfg.n_heads, head_dim=cfg.d_head,
        hidden_act=cfg.act_fn, max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        attention_bias=attention_bias, mlp_bias=mlp_bias, tie_word_embeddings=False, **token_ids,
    )


# ---------------------------------------------------------------- the folder


@dataclass
class Exported:
    """What `export_hf` wrote."""

    folder: Path
    architecture: str
    """"gpt2" (GPT2LMHeadModel) or "llama" (LlamaForCausalLM)."""
    unembed_bias_dropped: float
    """The spread (max - min) of an `unembed.b_U` dropped from a Llama export: the most any
    log-prob moved. 0 when none moved (GPT-2 exports keep b_U exactly)."""
    notes: list[str]
    """What a user of the folder should know (no tokenizer, a tokenizer larger than the model)."""


def export_hf(model: HookedTransformer, out_dir: str | Path, drop_unembed_bias: bool = False,
              prepend_bos: bool | None = None) -> Exported:
    """Write `model` to `out_dir` as a Hugging Face model folder: config.json, the weights as
    model.safetensors, and the tokenizer's files.

    Args:
        model: a GPT-2- or Llama-shaped HookedTransformer (adapters, if any, merged in).
        drop_unembed_bias: export a Llama-shaped model even when `unembed.b_U` differs between
            tokens (Llama cannot hold it), which changes log-probs by up to its spread.
        prepend_bos: whether the saved tokenizer puts BOS first, as the policy was fed (a run's
            `prepend_bos`); None: `model.cfg.default_prepend_bos`.

    Raises:
        ExportError: the model's config has a feature the architecture lacks (the field is
            named), b_U would be dropped unasked, or LoRA adapters are not merged yet.
    """
    if get_adapters(model) is not None:
        raise ExportError("The model has LoRA adapters: merge them into its weights first "
                          "(minirlhf.runtime.lora.merge_lora(model)).")
    cfg = model.cfg
    architecture = get_architecture(cfg)
    token_ids, notes = describe_tokenizer(model.tokenizer, cfg.d_vocab)
    config, weights, dropped = get_hf_weights(model, architecture, token_ids, drop_unembed_bias)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=cfg.dtype)
    # strict: every weight transformers expects is given, each with the shape it expects.
    hf_model.load_state_dict(weights, strict=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, out_dir,
                       cfg.default_prepend_bos if prepend_bos is None else prepend_bos)
    return Exported(Path(out_dir), architecture, dropped, notes)


def get_hf_weights(model: HookedTransformer, architecture: str, token_ids: dict,
                   drop_unembed_bias: bool) -> tuple[GPT2Config | LlamaConfig, StateDict, float]:
    """The Hugging Face config and state dict of `model`, and the spread of a dropped b_U."""
    cfg = model.cfg
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    # A tied model (`runtime.tied`) keeps no W_U of its own (`keeps_tie`: nor does the folder).
    state.setdefault("unembed.W_U", model.W_U.detach())
    b_U, dropped = state["unembed.b_U"], 0.0
    if architecture == "gpt2":
        carry = float(b_U.max() - b_U.min()) > UNEMBED_BIAS_TOLERANCE
        config, weights = get_gpt2_config(cfg, token_ids), get_gpt2_weights(state, cfg, carry)
    else:
        dropped = check_unembed_bias(b_U, drop_unembed_bias)
        weights, attention_bias, mlp_bias = drop_zero_biases(get_llama_weights(state, cfg))
        config = get_llama_config(cfg, token_ids, attention_bias, mlp_bias)
    config.tie_word_embeddings = keeps_tie(model, weights)
    return config, weights, dropped


def keeps_tie(model: HookedTransformer, weights: StateDict) -> bool:
    """Whether the folder ties lm_head to the input embedding, as a tied model (`runtime.tied`)
    does: yes unless carrying GPT-2's unembedding bias (`carry_unembed_bias_in_norm`) made
    lm_head a different matrix."""
    embedding = weights.get("transformer.wte.weight", weights.get("model.embed_tokens.weight"))
    return is_tied(model) and torch.equal(weights["lm_head.weight"], embedding)


def save_tokenizer(tokenizer, out_dir: str | Path, prepend_bos: bool):
    """The tokenizer's files, set to add BOS as the policy saw it. TransformerLens attaches a
    copy that always adds BOS (its `to_tokens` decides), unlike GPT-2's own tokenizer."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_bos_token = prepend_bos
    tokenizer.save_pretrained(out_dir)


def describe_tokenizer(tokenizer, d_vocab: int) -> tuple[dict, list[str]]:
    """The special token ids for the config (those inside the vocabulary), and notes."""
    if tokenizer is None:
        return {}, ["The model has no tokenizer, so the folder holds none: load one for it "
                    "(AutoTokenizer.from_pretrained) from the model it was trained from."]
    token_ids, notes = {}, []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None and token_id < d_vocab:
            token_ids[name] = token_id
    if len(tokenizer) > d_vocab:
        notes.append(f"The tokenizer has {len(tokenizer)} tokens but the model only {d_vocab}: "
                     f"ids from {d_vocab} up are outside the model (a cut-down test vocabulary).")
    return token_ids, notes


@torch.no_grad()
def compare_logprobs(model: HookedTransformer, folder: str | Path, seq: int = 16,
                     seed: int = 0) -> float:
    """The largest |log-prob difference| between `model` and the exported folder as
    transformers loads it, over two random token sequences of length `seq`."""
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=model.cfg.dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(model.cfg.d_vocab, (2, min(seq, model.cfg.n_ctx)), generator=generator)
    ours = model(tokens.to(model.cfg.device)).float().log_softmax(-1).cpu()
    theirs = hf_model(tokens).logits.float().log_softmax(-1)
    return float((ours - theirs).abs().max())
