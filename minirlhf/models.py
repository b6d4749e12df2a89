"""The policy with its value head, and the frozen reference model.

Stage 1 of the pipeline. The value head reads the residual stream after the final layernorm
(`ln_final.hook_normalized`), the same vector the unembedding reads, so one forward pass gives
both the next-token logits and a value estimate V(s_t) at every position. This is the ARENA RLHF
design; sharing the trunk between policy and value follows Ziegler et al. (2019).

How a forward pass runs is decided here and nowhere above: on `runtime.fast_path` when it can run
the model (the same logits, weights laid out once), else through `HookedTransformer.forward`,
where hooks a user attached (steering, ablations) take effect.
"""

import copy
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from minirlhf.advantages import ESTIMATORS
from minirlhf.args import RLHFArgs
from minirlhf.runtime import distributed, lora
from minirlhf.runtime import fast_path as fast
from minirlhf.runtime.trunk import Trunk, get_trunk, mask_or_none
from minirlhf.sampling import Samples, apply_temperature, get_chunk_logits
from minirlhf.token_stats import ChunkLogits, calc_kl_from_stats, get_token_stats

VALUE_HOOK = "ln_final.hook_normalized"


def generated_states(prefix_len: int) -> slice:
    """The positions that chose the generated tokens: `prefix_len - 1 .. seq - 2`."""
    return slice(prefix_len - 1, -1)


def run_model(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    fast_path: bool,
    positions: slice = slice(None),
    trunk: Trunk | None = None,
    unembed: bool = True,
    checkpoint_blocks: bool = False,
) -> tuple[Float[Tensor, "batch out_seq d_vocab"] | None, Float[Tensor, "batch out_seq d_model"]]:
    """One forward pass: the logits (None on the fast path without `unembed`) and the final
    normalised residual stream at `positions` (only those are unembedded on the fast path). With
    `trunk`, the blocks below `trunk.layer` are not run: `trunk.residual` is read instead.
    `checkpoint_blocks`: recompute each block in the backward pass (fast path only)."""
    attention_mask = mask_or_none(attention_mask)
    if fast.use_fast_path(model, fast_path):
        start = 0 if trunk is None else trunk.layer
        weights = fast.get_fast_weights(model, from_layer=start)
        residual = fast.forward(weights, tokens, attention_mask, layers=slice(start, None),
                                residual=None if trunk is None else trunk.residual,
                                checkpoint_blocks=checkpoint_blocks)
        residual = residual[:, positions]
        return (fast.unembed(weights.output, residual) if unembed else None), residual
    captured: list[Float[Tensor, "batch seq d_model"]] = []

    def capture(residual: Float[Tensor, "batch seq d_model"], hook: HookPoint):
        captured.append(residual)

    model_input = tokens if trunk is None else trunk.residual
    logits = model.run_with_hooks(model_input, return_type="logits", attention_mask=attention_mask,
                                  fwd_hooks=[(VALUE_HOOK, capture)],
                                  start_at_layer=None if trunk is None else trunk.layer)
    return logits[:, positions], captured[0][:, positions]


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

    What the learning steps on a rollout's samples reuse is its own business (`keep`): the frozen
    trunk's output, when the bottom blocks do not train.

    Args:
        base_model: any HookedTransformer (pretrained, converted, or tiny and random), its
            trainable weights marked (`prepare_policy`).
        temperature: the sampling temperature; `forward_generated`'s logits are divided by it.
        fast_path: run forward passes on `minirlhf.runtime.fast_path` where it can.
        value_head: False for a critic-free estimator: no head, no parameters, values None.
        frozen_layers: blocks at the bottom that do not train (`prepare_policy`'s result).
        checkpoint_blocks: the learning steps keep each block's input, not its activations, and
            recompute the block in the backward pass (`fast_path.forward`).
    """

    def __init__(self, base_model: HookedTransformer, temperature: float = 1.0,
                 fast_path: bool = True, value_head: bool = True, frozen_layers: int = 0,
                 checkpoint_blocks: bool = False):
        super().__init__()
        self.base_model = base_model
        self.temperature = temperature
        self.fast_path = fast_path
        self.frozen_layers = frozen_layers
        if checkpoint_blocks and not fast.use_fast_path(base_model, fast_path):
            reason = fast.unsupported_reason(base_model) or "fast_path is off"
            raise ValueError("activation_checkpointing runs on the fast path, which this policy "
                             f"cannot use ({reason}): turn activation_checkpointing off.")
        self.checkpoint_blocks = checkpoint_blocks
        d_model = base_model.cfg.d_model
        self.value_head = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.ReLU(),
            nn.Linear(4 * d_model, 1),
        ).to(base_model.cfg.device) if value_head else None

    def forward(
        self,
        tokens: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"] | None = None,
    ) -> tuple[Float[Tensor, "batch seq d_vocab"], Float[Tensor, "batch seq"] | None]:
        """`(logits, values)` at every position, from one forward pass."""
        logits, residual = run_model(self.base_model, tokens, attention_mask, self.fast_path)
        return logits, self.get_values(residual)

    @torch.no_grad()
    def keep(
        self, sample_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"]
    ) -> dict[str, Tensor]:
        """What every later forward pass on these samples reuses, one row per sample: the frozen
        trunk's output (nothing when every block trains)."""
        if not self.frozen_layers:
            return {}
        trunk = get_trunk(self.base_model, sample_ids, attention_mask, self.frozen_layers,
                          self.fast_path)
        return {"trunk": trunk.residual}

    def forward_generated(
        self,
        sample_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
        prefix_len: int,
        kept: dict[str, Tensor] | None = None,
        final_residual: Float[Tensor, "batch gen_len d_model"] | None = None,
    ) -> tuple[Float[Tensor, "batch gen_len d_vocab"], Float[Tensor, "batch gen_len"] | None]:
        """Logits / temperature and values (float32; values None without a head) in the states
        that chose the generated tokens (positions `prefix_len - 1 .. seq - 2`). `kept`: what
        `keep` returned for these rows. `final_residual` (the sampler's) spares the forward pass."""
        get_logits, values = self.get_generated(sample_ids, attention_mask, prefix_len, kept,
                                                final_residual)
        return get_logits(slice(None)), values

    def get_generated(
        self, sample_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"],
        prefix_len: int, kept: dict[str, Tensor] | None = None,
        final_residual: Float[Tensor, "batch gen_len d_model"] | None = None,
    ) -> tuple[ChunkLogits, Float[Tensor, "batch gen_len"] | None]:
        """`forward_generated` with the logits left for later, a slice of positions at a time
        (`token_stats`): on the fast path, each slice of the final residual unembedded."""
        logits = None  # the sampler's final residual: only the unembedding and head run
        if final_residual is None:
            trunk = Trunk(self.frozen_layers, kept["trunk"]) if kept and "trunk" in kept else None
            logits, final_residual = run_model(self.base_model, sample_ids, attention_mask,
                                               self.fast_path, generated_states(prefix_len),
                                               trunk, unembed=False,
                                               checkpoint_blocks=self.checkpoint_blocks)
        get_logits = get_chunk_logits(self.base_model, logits, final_residual, self.temperature)
        return get_logits, self.get_values(final_residual)

    def get_values(
        self, final_residual: Float[Tensor, "batch seq d_model"]
    ) -> Float[Tensor, "batch seq"] | None:
        """The value head (float32) on final normalised residuals (`ln_final.hook_normalized`);
        None without a head."""
        if self.value_head is None:
            return None
        # The head may run in float32 while the trunk runs in lower precision.
        values = self.value_head(final_residual.to(self.value_head[0].weight.dtype))
        return values.squeeze(-1).float()


class ReferenceModel:
    """The policy as it was at the start of training, frozen: the anchor of the KL penalty.

    What is copied: only the weights that train. A LoRA policy (`minirlhf.runtime.lora`) is its
    own reference with the adapters off, so nothing is copied; a policy with a frozen trunk
    shares the trunk's weights (and its output, `kept["trunk"]`) and copies only the top blocks.

    The learning phase asks it for its logits on each minibatch; how they get there is its own
    business. By default it keeps the logits themselves (`kept["reference"]`). With
    `keep_residual`, it keeps its final residual stream instead (d_model floats per token instead
    of d_vocab: 85x less for SmolLM2), and `get_logits` reruns only the unembedding.

    Args:
        base_model: the policy's HookedTransformer, with its trainable weights marked
            (`requires_grad`) and its adapters attached, if any.
        temperature: the sampling temperature (logits are divided by it, as the policy's are).
        fast_path: run forward passes on `minirlhf.runtime.fast_path` where it can.
        keep_residual: keep the final residual stream rather than the logits (only where the
            fast path supports the model, whose unembedding `get_logits` then reruns).
        frozen_layers: the policy's frozen trunk, shared.
    """

    def __init__(self, base_model: HookedTransformer, temperature: float = 1.0,
                 fast_path: bool = True, keep_residual: bool = False, frozen_layers: int = 0):
        self.shares_policy = lora.get_adapters(base_model) is not None
        self.model = base_model if self.shares_policy else frozen_copy(base_model)
        self.temperature = temperature
        self.fast_path = fast_path
        self.frozen_layers = frozen_layers
        self.keep_residual = keep_residual and fast.unsupported_reason(self.model) is None

    @classmethod
    def of_policy(cls, policy: TransformerWithValueHead,
                  keep_residual: bool = False) -> "ReferenceModel":
        """The reference of a policy: its weights now, its temperature and frozen trunk."""
        return cls(policy.base_model, policy.temperature, policy.fast_path, keep_residual,
                   policy.frozen_layers)

    @torch.no_grad()
    def forward_generated(
        self,
        sample_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
        prefix_len: int,
        kept: dict[str, Tensor] | None = None,
    ) -> tuple[Float[Tensor, "batch gen_len d_vocab"], dict[str, Tensor]]:
        """Logits / temperature in the states that chose the generated tokens, and what it keeps
        for `get_logits` (`{"reference": those logits, or the final residual stream}`).
        `kept`: the policy's, whose frozen trunk the reference shares."""
        get_logits, kept = self.get_generated(sample_ids, attention_mask, prefix_len, kept)
        return get_logits(slice(None)), kept

    @torch.no_grad()
    def get_generated(
        self, sample_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"],
        prefix_len: int, kept: dict[str, Tensor] | None = None,
    ) -> tuple[ChunkLogits, dict[str, Tensor]]:
        """`forward_generated` with the logits a slice of positions at a time (`token_stats`)."""
        trunk = Trunk(self.frozen_layers, kept["trunk"]) if kept and "trunk" in kept else None
        with lora.adapters_off(self.model):
            logits, residual = run_model(self.model, sample_ids, attention_mask, self.fast_path,
                                         generated_states(prefix_len), trunk,
                                         unembed=not self.keep_residual)
        kept = {"reference": residual.contiguous() if self.keep_residual
                else apply_temperature(logits, self.temperature)}
        return self.get_chunk_logits(kept), kept

    @torch.no_grad()
    def get_logits(
        self, kept: dict[str, Tensor]
    ) -> Float[Tensor, "minibatch gen_len d_vocab"]:
        """The logits / temperature from what `forward_generated` kept (for a minibatch's rows)."""
        return self.get_chunk_logits(kept)(slice(None))

    def get_chunk_logits(self, kept: dict[str, Tensor]) -> ChunkLogits:
        """`get_logits` at a slice of positions: the kept logits sliced, or the kept residual's
        slice unembedded (no gradient either way)."""
        reference = kept["reference"]
        if not self.keep_residual:
            return lambda positions: reference[:, positions]
        return torch.no_grad()(get_chunk_logits(self.model, None, reference, self.temperature))


def build_policy(base_model: HookedTransformer, args: RLHFArgs) -> TransformerWithValueHead:
    """The policy `args` describes: what trains (`prepare_policy`), and a value head only when
    the advantage estimator needs a critic."""
    frozen_layers = prepare_policy(base_model, args.trainable_layers, args.lora_rank,
                                   args.lora_alpha, args.lora_targets)
    return TransformerWithValueHead(base_model, args.temperature, args.fast_path,
                                    ESTIMATORS[args.advantage_estimator].needs_critic,
                                    frozen_layers, args.activation_checkpointing)


class RolloutOutputs(NamedTuple):
    """What the policy and the reference make of a rollout's samples (no gradients)."""

    logprobs: Float[Tensor, "batch gen_len"]
    values: Float[Tensor, "batch gen_len"] | None
    """V(s_t) in the state that chose each generated token (None: no value head)."""
    kl: Float[Tensor, "batch gen_len"]
    """KL(policy || reference) of each token by the run's estimator (`losses.calc_kl`)."""
    exact_kl: Float[Tensor, "batch gen_len"]
    """The exact KL, summed over the vocabulary (logged whichever estimator trains)."""
    entropy: Float[Tensor, "batch gen_len"]
    kept: dict[str, Tensor]
    """One row per sample, for the models alone: what the learning steps hand back to
    `TransformerWithValueHead.forward_generated` and `ReferenceModel.get_logits`."""


@torch.no_grad()
def get_rollout_outputs(
    policy: TransformerWithValueHead, reference: ReferenceModel, samples: Samples,
    kl_estimator: str, rows_per_chunk: int,
) -> RolloutOutputs:
    """The policy's log-probs and values, the KL to the reference and the entropy of every
    generated token, and what the models keep: `rows_per_chunk` rows at a time, a few positions
    at a time (`token_stats`). The sampler's final residual stream spares
    the policy's forward pass; a frozen trunk runs once, for the reference and every learning
    step."""
    ids, mask, prefix_len = samples.sample_ids, samples.attention_mask, samples.prefix_len
    parts = []
    for rows in torch.arange(len(ids), device=ids.device).split(rows_per_chunk):
        kept = policy.keep(ids[rows], mask[rows])
        final = None if samples.final_residual is None else samples.final_residual[rows]
        get_logits, values = policy.get_generated(ids[rows], mask[rows], prefix_len, kept, final)
        get_ref_logits, ref_kept = reference.get_generated(ids[rows], mask[rows], prefix_len, kept)
        stats = get_token_stats(get_logits, ids[rows, prefix_len:], get_ref_logits)
        parts.append(RolloutOutputs(stats.logprobs, values, calc_kl_from_stats(kl_estimator, stats),
                                    stats.exact_kl, stats.entropy, kept | ref_kept))
    *per_token, _ = zip(*parts)
    joined = [None if part[0] is None else torch.cat(part) for part in per_token]
    kept = {name: torch.cat([part.kept[name] for part in parts]) for name in parts[0].kept}
    return RolloutOutputs(*joined, kept)


def frozen_copy(model: HookedTransformer) -> HookedTransformer:
    """A frozen copy of the model sharing its frozen weights, copying only those that train."""
    shared = {id(param): param for param in model.parameters() if not param.requires_grad}
    copied = copy.deepcopy(model, memo=shared).eval()
    for param in copied.parameters():
        param.requires_grad_(False)
    return copied


class GlobalBatch(NamedTuple):
    """A rollout as batch-wide statistics see it: every process's rows and per-token outputs
    (`kept` stays with its process), where each answer ends, and which rows are this process's."""

    texts: list[str]
    rewards: Float[Tensor, " batch"]
    outputs: RolloutOutputs
    response_mask: Int[Tensor, "batch gen_len"] | None
    ended: Bool[Tensor, " batch"] | None
    sampler_logprobs: Float[Tensor, "batch gen_len"] | None
    """The log-probs the sampler drew each token from (to compare with `outputs.logprobs`)."""
    local: slice
    responses: list[str] | None = None
    """Each answer's text alone (`Samples.responses`), for the fluency metrics."""


def gather_rollout(
    samples: Samples, rewards: Float[Tensor, " batch"], outputs: RolloutOutputs
) -> GlobalBatch:
    """Every process's texts, rewards, answer ends and per-token outputs, in process order (one
    process: its own, as they are); never logits."""
    def gather(value: Tensor | None) -> Tensor | None:
        return None if value is None else distributed.gather_rows(value)

    distributed.wait_for_others("the end of the rollout")  # names a process that stalled
    rows = {name: gather(value) for name, value in outputs._asdict().items() if name != "kept"}
    rewards = distributed.gather_rows(rewards)
    return GlobalBatch(distributed.gather_objects(samples.texts), rewards,
                       RolloutOutputs(**rows, kept={}), gather(samples.response_mask),
                       gather(samples.ended), gather(samples.logprobs),
                       distributed.local_rows(len(rewards)),
                       None if samples.responses is None
                       else distributed.gather_objects(samples.responses))
