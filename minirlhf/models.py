"""The policy with its value head, and the frozen reference model.

Stage 1 of the pipeline. The value head reads the residual stream after the final layernorm
(`ln_final.hook_normalized`), the same vector the unembedding reads, so one forward pass gives
both the next-token logits and a value estimate V(s_t) at every position. This is the ARENA RLHF
design; sharing the trunk between policy and value follows Ziegler et al. (2019).

How a forward pass runs is decided here and nowhere above: on `minirlhf.runtime.fast_path` when it can run
the model (the same logits, weights laid out once), else through `HookedTransformer.forward`,
where hooks a user attached (steering, ablations) take effect.
"""

import copy
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from minirlhf.runtime import fast_path as fast
from minirlhf.runtime import lora
from minirlhf.sampling import apply_temperature

VALUE_HOOK = "ln_final.hook_normalized"


def mask_or_none(
    attention_mask: Int[Tensor, "batch seq"] | None,
) -> Int[Tensor, "batch seq"] | None:
    """The mask only when there is padding: unpadded batches take the faster causal path."""
    return None if attention_mask is None or bool(attention_mask.all()) else attention_mask


def generated_states(prefix_len: int) -> slice:
    """The positions whose next-token distributions chose the generated tokens: the last prompt
    position to the second-to-last position (`prefix_len - 1 .. seq - 2`)."""
    return slice(prefix_len - 1, -1)


def run_model(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    fast_path: bool,
    positions: slice = slice(None),
    trunk: "Trunk | None" = None,
) -> tuple[Float[Tensor, "batch out_seq d_vocab"], Float[Tensor, "batch out_seq d_model"]]:
    """One forward pass: the logits and the final normalised residual stream at `positions`
    (only those are unembedded on the fast path). With `trunk`, the blocks below `trunk.layer`
    are not run: their output, `trunk.residual`, is read instead."""
    attention_mask = mask_or_none(attention_mask)
    if fast.use_fast_path(model, fast_path):
        start = 0 if trunk is None else trunk.layer
        weights = fast.get_fast_weights(model, from_layer=start)
        residual = fast.forward(weights, tokens, attention_mask, layers=slice(start, None),
                                residual=None if trunk is None else trunk.residual)
        residual = residual[:, positions]
        return fast.unembed(weights.output, residual), residual
    captured: list[Float[Tensor, "batch seq d_model"]] = []

    def capture(residual: Float[Tensor, "batch seq d_model"], hook: HookPoint):
        captured.append(residual)

    model_input = tokens if trunk is None else trunk.residual
    logits = model.run_with_hooks(model_input, return_type="logits", attention_mask=attention_mask,
                                  fwd_hooks=[(VALUE_HOOK, capture)],
                                  start_at_layer=None if trunk is None else trunk.layer)
    return logits[:, positions], captured[0][:, positions]


class Trunk(NamedTuple):
    """A frozen trunk's output: the residual stream entering block `layer`, at every position."""

    layer: int
    residual: Float[Tensor, "batch seq d_model"]


@torch.no_grad()
def get_trunk(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    layer: int,
    fast_path: bool,
) -> Trunk:
    """What the blocks below `layer` compute (once per phase when they are frozen)."""
    attention_mask = mask_or_none(attention_mask)
    if fast.use_fast_path(model, fast_path):
        weights = fast.get_fast_weights(model, to_layer=layer)
        residual = fast.forward(weights, tokens, attention_mask, layers=slice(None, layer))
    else:
        residual = model(tokens, attention_mask=attention_mask, stop_at_layer=layer)
    return Trunk(layer, residual)


def freeze_trunk(model: HookedTransformer, trainable_layers: int | None) -> int:
    """Freeze every weight but the top `trainable_layers` blocks and the final norm (None: freeze
    nothing). Returns how many blocks are frozen: the trunk, whose output can be computed once
    and reused. Frozen weights get no gradient, so a backward pass stops at the lowest
    trainable block."""
    if trainable_layers is None:
        return 0
    n_frozen = max(0, model.cfg.n_layers - trainable_layers)
    trainable = {id(p) for block in model.blocks[n_frozen:] for p in block.parameters()}
    trainable |= {id(p) for p in model.ln_final.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    return n_frozen


def freeze_absent_unembed_bias(model: HookedTransformer):
    """Keep the unembedding's bias at zero where the model has none (TransformerLens gives GPT-2
    and Llama models a zero `b_U`): training it would make a model that their architectures
    cannot hold, so `minirlhf export` could not write it exactly."""
    if not model.unembed.b_U.detach().any():
        model.unembed.b_U.requires_grad_(False)


def prepare_policy(
    model: HookedTransformer, trainable_layers: int | None = None, lora_rank: int = 0,
    lora_alpha: float = 16.0, lora_targets: str = ",".join(lora.LORA_TARGETS),
) -> int:
    """Decide what of the policy trains (the `RLHFArgs` fields of the same names): every weight,
    the top `trainable_layers` blocks, or LoRA adapters (on those blocks, else on all).
    Returns the number of frozen blocks at the bottom: the trunk, computed once per phase."""
    n_layers = model.cfg.n_layers
    if trainable_layers is not None and trainable_layers > n_layers:
        raise ValueError(f"trainable_layers is {trainable_layers} but the model has only "
                         f"{n_layers} blocks: give at most {n_layers}, or None to train all.")
    n_frozen = freeze_trunk(model, trainable_layers)
    freeze_absent_unembed_bias(model)
    if lora_rank:
        lora.add_lora(model, lora_rank, lora_alpha, lora.parse_targets(lora_targets),
                      list(range(n_frozen, n_layers)))
    return n_frozen


class TransformerWithValueHead(nn.Module):
    """A HookedTransformer policy plus a value head on its final normalised residual stream.

    Args:
        base_model: any HookedTransformer (pretrained, converted, or tiny and random).
        temperature: the sampling temperature; `evaluate`'s logits are divided by it.
        fast_path: run forward passes on `minirlhf.runtime.fast_path` where it can run the model.
    """

    def __init__(self, base_model: HookedTransformer, temperature: float = 1.0,
                 fast_path: bool = True):
        super().__init__()
        self.base_model = base_model
        self.temperature = temperature
        self.fast_path = fast_path
        d_model = base_model.cfg.d_model
        self.value_head = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.ReLU(),
            nn.Linear(4 * d_model, 1),
        ).to(base_model.cfg.device)

    def forward(
        self,
        tokens: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"] | None = None,
    ) -> tuple[Float[Tensor, "batch seq d_vocab"], Float[Tensor, "batch seq"]]:
        """`(logits, values)` at every position, from one forward pass."""
        logits, residual = run_model(self.base_model, tokens, attention_mask, self.fast_path)
        return logits, self.get_values(residual)

    def evaluate(
        self,
        sample_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
        prefix_len: int,
        final_residual: Float[Tensor, "batch gen_len d_model"] | None = None,
        trunk: Trunk | None = None,
    ) -> tuple[Float[Tensor, "batch gen_len d_vocab"], Float[Tensor, "batch gen_len"]]:
        """Logits / temperature (float32) and values (float32) in the states that chose the
        generated tokens (positions `prefix_len - 1 .. seq - 2`).

        `final_residual` (the sampler's, `Samples.final_residual`) spares the forward pass:
        only the unembedding and the value head run. `trunk` (a frozen trunk's output) spares
        the blocks below it."""
        if final_residual is None:
            logits, residual = run_model(self.base_model, sample_ids, attention_mask,
                                         self.fast_path, generated_states(prefix_len), trunk)
        else:
            residual = final_residual
            logits = fast.unembed(fast.get_output_weights(self.base_model), residual)
        return apply_temperature(logits, self.temperature), self.get_values(residual).float()

    def get_values(
        self, final_residual: Float[Tensor, "batch seq d_model"]
    ) -> Float[Tensor, "batch seq"]:
        """The value head on final normalised residuals (what `ln_final.hook_normalized` holds)."""
        # The head may run in float32 while the trunk runs in lower precision.
        return self.value_head(final_residual.to(self.value_head[0].weight.dtype)).squeeze(-1)


class ReferenceModel:
    """The policy as it was at the start of training, frozen: the anchor of the KL penalty.

    What is copied: only the weights that train. A LoRA policy (`minirlhf.runtime.lora`) is its own
    reference with the adapters off, so nothing is copied; a policy with a frozen trunk shares
    the trunk's weights with its reference and copies only the top blocks.

    The learning phase asks it for its logits on each minibatch; how they get there is its own
    business. By default `evaluate` returns the logits themselves for the replay memory to keep.
    With `keep_residual`, it returns its final residual stream instead (d_model floats per token
    instead of d_vocab: 85x less for SmolLM2), and `get_logits` reruns only the unembedding.

    Args:
        base_model: the policy's HookedTransformer, with its trainable weights marked
            (`requires_grad`) and its adapters attached, if any.
        temperature: the sampling temperature (logits are divided by it, as the policy's are).
        fast_path: run forward passes on `minirlhf.runtime.fast_path` where it can run the model.
        keep_residual: keep the final residual stream rather than the logits (only where the
            fast path supports the model, whose unembedding `get_logits` then reruns).
    """

    def __init__(self, base_model: HookedTransformer, temperature: float = 1.0,
                 fast_path: bool = True, keep_residual: bool = False):
        self.shares_policy = lora.get_adapters(base_model) is not None
        self.model = base_model if self.shares_policy else frozen_copy(base_model)
        self.temperature = temperature
        self.fast_path = fast_path
        self.keep_residual = keep_residual and fast.unsupported_reason(self.model) is None

    @torch.no_grad()
    def evaluate(
        self,
        sample_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
        prefix_len: int,
        trunk: Trunk | None = None,
    ) -> tuple[Float[Tensor, "batch gen_len d_vocab"], Float[Tensor, "batch gen_len d_ref"]]:
        """Logits / temperature in the states that chose the generated tokens, and what the
        replay memory keeps for `get_logits` (those logits, or the final residual stream).
        `trunk`: the frozen trunk's output, which policy and reference share."""
        with lora.adapters_off(self.model):
            logits, residual = run_model(self.model, sample_ids, attention_mask, self.fast_path,
                                         generated_states(prefix_len), trunk)
        logits = apply_temperature(logits, self.temperature)
        return logits, residual.contiguous() if self.keep_residual else logits

    @torch.no_grad()
    def get_logits(
        self, kept: Float[Tensor, "minibatch gen_len d_ref"]
    ) -> Float[Tensor, "minibatch gen_len d_vocab"]:
        """The logits / temperature from what `evaluate` returned for the memory to keep."""
        if not self.keep_residual:
            return kept
        logits = fast.unembed(fast.get_output_weights(self.model), kept)
        return apply_temperature(logits, self.temperature)


def get_trained_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's `state_dict` without its frozen parameters: a LoRA or frozen-trunk run's
    checkpoint holds what trained (and the buffers), not a copy of the base model."""
    frozen = {name for name, param in module.named_parameters() if not param.requires_grad}
    return {name: value for name, value in module.state_dict().items() if name not in frozen}


def load_trained_state(module: nn.Module, state: dict[str, Tensor]):
    """Load `get_trained_state`'s output (or a whole `state_dict`) into a module built the same
    way (the same base model, trainable layers and adapters): only frozen parameters, which the
    base model already holds, may be missing."""
    frozen = {name for name, param in module.named_parameters() if not param.requires_grad}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) - frozen:
        raise ValueError(
            f"The saved policy does not fit this model (unexpected {sorted(unexpected)[:4]}, "
            f"missing {sorted(set(missing) - frozen)[:4]}): build it with the run's own "
            "base_model, trainable_layers and LoRA settings (its run.json)."
        )


def frozen_copy(model: HookedTransformer) -> HookedTransformer:
    """A frozen copy of the model that shares its frozen weights (`requires_grad` False) and
    copies only the ones that train."""
    shared = {id(param): param for param in model.parameters() if not param.requires_grad}
    copied = copy.deepcopy(model, memo=shared).eval()
    for param in copied.parameters():
        param.requires_grad_(False)
    return copied
