"""LoRA: train a low-rank correction to chosen weight matrices, and nothing else of the model.

Part of the model layer (stage 1). Hu et al. (2021): a frozen weight W (d_out x d_in) is used as
W + (alpha / rank) * B @ A, with A (rank x d_in) random and B (d_out x rank) zero, so training
starts from exactly the base model and learns rank * (d_in + d_out) numbers per matrix instead of
d_in * d_out. Turning the adapters off gives back the base model: the PPO reference model is the
policy with its adapters off, and no second copy of the weights is held.

Targets (`LORA_TARGETS`) name the linear maps of a block: attention "q", "k", "v" (each on the
block's normalised input) and "o" (on the heads' outputs z), MLP "in", "gate" (gated MLPs) and
"out" (on the MLP's hidden activation).

Both forward paths see the adapters:
- TransformerLens's forward, through permanent hooks (`LoraHook`), which add each adapter's term
  to the activation the matrix produced (`hook_q`, `hook_attn_out`, `mlp.hook_pre`, ...). So
  `run_with_cache` on a LoRA policy shows every activation as the policy computes it.
- `runtime.fast_path`, which adds the low-rank term to its laid-out matrices when gradients are
  needed, and merges it into them (W + scale * B @ A, once per call) when they are not, as for
  sampling.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

LORA_TARGETS = ("q", "k", "v", "o", "in", "gate", "out")
"""The linear maps of a block that can take an adapter."""


class Lora(nn.Module):
    """One adapter: x -> scale * B(A(x)), the low-rank term added to a frozen x @ W.T.

    Args:
        d_in, d_out: the adapted matrix's input and output sizes.
        rank: the inner size r (a few; the adapter has r * (d_in + d_out) parameters).
        alpha: the scale is alpha / rank, so changing the rank does not change the size of the
            first updates (Hu et al. 2021).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(d_out, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)  # nn.Linear's initialisation
        self.alpha, self.scale = alpha, alpha / rank

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def delta(self) -> Float[Tensor, "d_out d_in"]:
        """The change to the weight in `F.linear` layout: scale * B @ A."""
        return self.B @ self.A * self.scale


class LoraAdapters(nn.Module):
    """The adapters of a model, keyed "{layer}_{target}" (ModuleDict keys cannot hold dots),
    and whether they are on."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.enabled = True

    def get(self, layer: int, target: str) -> Lora | None:
        """The adapter of `target` in block `layer`, or None (that matrix is not adapted)."""
        key = f"{layer}_{target}"
        return self.adapters[key] if key in self.adapters else None


class LoraHook:
    """A TransformerLens hook that adds an adapter's term (computed from an input another hook
    or module captured earlier in the same forward pass) to the activation. Hooks of this class
    are the model's own computation, not a user's intervention: the fast path knows them."""

    def __init__(self, adapters: LoraAdapters, adapter: Lora | None, inputs: dict, key: str):
        self.adapters, self.adapter, self.inputs, self.key = adapters, adapter, inputs, key

    def __call__(self, activation: Tensor, hook: HookPoint) -> Tensor | None:
        if self.adapter is None:  # capture only: a later hook reads this input
            # z [batch, pos, head, d_head] enters W_O as [batch, pos, head * d_head]
            self.inputs[self.key] = activation.flatten(-2) if self.key == "z" else activation
            return None
        if not self.adapters.enabled:
            return None
        term = self.adapter(self.inputs[self.key])
        return activation + term.reshape(activation.shape).to(activation.dtype)


def get_adapters(model: HookedTransformer) -> LoraAdapters | None:
    """The model's adapters, or None when it has none."""
    adapters = getattr(model, "lora", None)
    return adapters if isinstance(adapters, LoraAdapters) else None


def _adapted_shapes(model: HookedTransformer) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each target in `F.linear` terms."""
    cfg = model.cfg
    d_kv = (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
    return {"q": (cfg.d_model, cfg.n_heads * cfg.d_head), "k": (cfg.d_model, d_kv),
            "v": (cfg.d_model, d_kv), "o": (cfg.n_heads * cfg.d_head, cfg.d_model),
            "in": (cfg.d_model, cfg.d_mlp), "gate": (cfg.d_model, cfg.d_mlp),
            "out": (cfg.d_mlp, cfg.d_model)}


def parse_targets(text: str) -> list[str]:
    """"q, v" -> ["q", "v"] (`RLHFArgs.lora_targets`), refusing names not in `LORA_TARGETS`."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    check_known(targets, text)
    return targets


def check_known(targets: list[str], given: object):
    """Every target is one of `LORA_TARGETS`, and there is at least one."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"lora_targets {given!r}: unknown {unknown or 'none'}; give a "
                         f"comma-separated subset of {','.join(LORA_TARGETS)} (e.g. 'q,v').")


def check_targets(model: HookedTransformer, targets: list[str]) -> list[str]:
    """The targets, checked against what the model has."""
    check_known(targets, targets)
    if "gate" in targets and not model.cfg.gated_mlp:
        targets = [t for t in targets if t != "gate"]  # a plain MLP has no gate: nothing to adapt
    cfg = model.cfg
    if cfg.use_split_qkv_input or cfg.use_attn_in or cfg.use_hook_mlp_in:
        raise NotImplementedError("LoRA hooks need use_split_qkv_input, use_attn_in and "
                                  "use_hook_mlp_in off (the model's defaults).")
    return targets


class NormOutput:
    """A capture hook on a norm's `hook_normalized`: stores the norm's output (the normalised
    input times its gain plus its bias, as the module returns it) for the q/k/v or MLP hooks."""

    def __init__(self, norm: nn.Module, inputs: dict, key: str):
        self.norm, self.inputs, self.key = norm, inputs, key

    def __call__(self, normalized: Tensor, hook: HookPoint) -> None:
        w, b = getattr(self.norm, "w", None), getattr(self.norm, "b", None)
        self.inputs[self.key] = normalized * w + b if b is not None else (
            normalized * w if w is not None else normalized)


class ClearInputs:
    """The last LoRA hook of a block: drops the inputs its adapters read (nothing outlives the
    forward pass)."""

    def __init__(self, inputs: dict):
        self.inputs = inputs

    def __call__(self, activation: Tensor, hook: HookPoint) -> None:
        self.inputs.clear()


LORA_HOOKS = (LoraHook, NormOutput, ClearInputs)
"""The classes of the hooks LoRA registers: the model's own computation, not a user's hooks."""


def _hook_sites(layer: int, gated: bool) -> dict[str, tuple[str, str, str]]:
    """For each target: (the hook point whose activation the adapter adds to, the hook point
    (or norm) that holds its input, the key the input is kept under)."""
    block = f"blocks.{layer}"
    return {
        "q": (f"{block}.attn.hook_q", f"{block}.ln1", "attn_in"),
        "k": (f"{block}.attn.hook_k", f"{block}.ln1", "attn_in"),
        "v": (f"{block}.attn.hook_v", f"{block}.ln1", "attn_in"),
        "o": (f"{block}.hook_attn_out", f"{block}.attn.hook_z", "z"),
        "in": (f"{block}.mlp.hook_pre_linear" if gated else f"{block}.mlp.hook_pre",
               f"{block}.ln2", "mlp_in"),
        "gate": (f"{block}.mlp.hook_pre", f"{block}.ln2", "mlp_in"),
        "out": (f"{block}.hook_mlp_out", f"{block}.mlp.hook_post", "post"),
    }


def add_lora(
    model: HookedTransformer, rank: int, alpha: float, targets: list[str],
    layers: list[int] | None = None,
) -> LoraAdapters:
    """Attach adapters to `targets` in `layers` (None: every block), freeze every weight of the
    model, and register the hooks that apply the adapters. Returns the adapters (also
    `model.lora`), the only parameters of the model left trainable.

    Adapters start with B = 0, so the model computes exactly what it did before."""
    if get_adapters(model) is not None:
        raise ValueError("This model already has LoRA adapters.")
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (got {rank}).")
    targets = check_targets(model, targets)
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    for param in model.parameters():
        param.requires_grad_(False)
    adapters = LoraAdapters()
    dtype, device = model.W_E.dtype, model.W_E.device
    shapes = _adapted_shapes(model)
    for layer in layers:
        for target in targets:
            adapters.adapters[f"{layer}_{target}"] = Lora(*shapes[target], rank, alpha, device,
                                                          dtype)
    model.lora = adapters  # a submodule: saved in state_dict, moved by .to()
    for layer in layers:
        _register_layer_hooks(model, adapters, layer, targets)
    return adapters


def _register_layer_hooks(model: HookedTransformer, adapters: LoraAdapters, layer: int,
                          targets: list[str]):
    inputs: dict[str, Tensor] = {}
    sites = _hook_sites(layer, model.cfg.gated_mlp)
    captured = set()
    for target in targets:
        _, source, key = sites[target]
        if key in captured:
            continue
        captured.add(key)
        if key in ("attn_in", "mlp_in"):  # the norm's output
            norm = model.get_submodule(source)
            capture = NormOutput(norm, inputs, key)
            model.hook_dict[f"{source}.hook_normalized"].add_hook(capture, is_permanent=True)
        else:
            model.hook_dict[source].add_hook(LoraHook(adapters, None, inputs, key),
                                             is_permanent=True)
    for target in targets:
        site, _, key = sites[target]
        model.hook_dict[site].add_hook(LoraHook(adapters, adapters.get(layer, target), inputs,
                                                key), is_permanent=True)
    model.hook_dict[f"blocks.{layer}.hook_resid_post"].add_hook(ClearInputs(inputs),
                                                               is_permanent=True)


@contextmanager
def adapters_off(model: HookedTransformer) -> Iterator[None]:
    """Run the model without its adapters (the base model: the PPO reference) inside the block.
    A no-op for a model without adapters."""
    adapters = get_adapters(model)
    if adapters is None:
        yield
        return
    was_enabled, adapters.enabled = adapters.enabled, False
    try:
        yield
    finally:
        adapters.enabled = was_enabled


def lora_active(model: HookedTransformer) -> bool:
    """Whether the model has adapters and they are on."""
    adapters = get_adapters(model)
    return adapters is not None and adapters.enabled


@torch.no_grad()
def merge_lora(model: HookedTransformer) -> HookedTransformer:
    """Fold the adapters into the weights, in place (W += scale * B @ A), and remove them and their
    hooks: the model then computes the same function without LoRA (for export or sampling
    elsewhere). Returns the model."""
    adapters = get_adapters(model)
    if adapters is None:
        return model
    for key, adapter in adapters.adapters.items():
        layer, target = key.split("_", 1)
        _add_delta(model.blocks[int(layer)], target, adapter.delta())
    for point in model.hook_dict.values():
        for handle in [h for h in point.fwd_hooks if isinstance(h.user_hook, LORA_HOOKS)]:
            handle.hook.remove()
            point.fwd_hooks.remove(handle)
    del model.lora
    return model


def _add_delta(block: nn.Module, target: str, delta: Float[Tensor, "d_out d_in"]):
    """Add an `F.linear`-layout delta to the block's TransformerLens-layout weight."""
    attn, mlp = block.attn, block.mlp
    if target in ("q", "k", "v"):
        name = {"q": "W_Q", "k": "_W_K" if hasattr(attn, "_W_K") else "W_K",
                "v": "_W_V" if hasattr(attn, "_W_V") else "W_V"}[target]
        weight = getattr(attn, name)  # [heads, d_model, d_head]
        weight += delta.T.reshape(weight.shape[1], weight.shape[0], weight.shape[2]).transpose(0, 1)
    elif target == "o":
        attn.W_O += delta.T.reshape(attn.W_O.shape)  # [heads, d_head, d_model]
    else:
        weight = {"in": mlp.W_in, "gate": getattr(mlp, "W_gate", None), "out": mlp.W_out}[target]
        weight += delta.T
