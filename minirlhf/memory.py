"""The replay memory: one rollout phase's data, served back as shuffled minibatches.

Stage 5 of the pipeline. Unlike PPO on gym environments there is no `add` (a whole phase is
stored at once), no `dones` (every sample has `gen_len` tokens) and no separate actions (the
generated tokens are the actions). It also keeps the reference logits for the exact KL penalty
(or, to save memory, the reference model's final residual stream, from which the trainer
recomputes them per minibatch).
Returns are advantages + values, the targets of the value head.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class ReplayMinibatch:
    """Everything one learning step needs, for `minibatch` samples."""

    sample_ids: Int[Tensor, "minibatch seq"]
    attention_mask: Int[Tensor, "minibatch seq"]
    logprobs: Float[Tensor, "minibatch gen_len"]
    advantages: Float[Tensor, "minibatch gen_len"]
    returns: Float[Tensor, "minibatch gen_len"]
    ref_logits: Float[Tensor, "minibatch gen_len d_vocab"] | None
    """None when the trainer recomputes them per minibatch (`recompute_ref_logits`)."""
    ref_normalized: Float[Tensor, "minibatch gen_len d_model"] | None = None
    """With `recompute_ref_logits` on the fast path: the reference model's final normalised
    residual stream, from which the trainer recomputes the reference logits (the unembedding
    only). None otherwise."""


class ReplayMemory:
    """Stores one rollout phase (all tensors indexed by sample along dim 0).

    Args:
        sample_ids: prompt + generated tokens.
        attention_mask: 1 for real tokens, 0 for left padding.
        logprobs: log-probs of the generated tokens under the policy that sampled them.
        advantages: one per generated token.
        values: V(s_t) for each generated token, i.e. `values[:, prefix_len - 1 : -1]`.
        ref_logits: the reference model's logits at the generated positions, or None to not
            hold them for the phase (the learning phase then recomputes them per minibatch).
        ref_normalized: optional, with `ref_logits=None`: the reference model's final normalised
            residual stream at the generated positions (d_model floats per token instead of
            d_vocab), so that only the unembedding needs recomputing.
    """

    def __init__(
        self,
        sample_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
        logprobs: Float[Tensor, "batch gen_len"],
        advantages: Float[Tensor, "batch gen_len"],
        values: Float[Tensor, "batch gen_len"],
        ref_logits: Float[Tensor, "batch gen_len d_vocab"] | None,
        ref_normalized: Float[Tensor, "batch gen_len d_model"] | None = None,
    ):
        batch, gen_len = logprobs.shape
        for name, tensor in [("advantages", advantages), ("values", values)]:
            assert tensor.shape == (batch, gen_len), (
                f"{name} has shape {tuple(tensor.shape)} but logprobs has {(batch, gen_len)}: "
                "slice values to the generated positions, values[:, prefix_len - 1 : -1]"
            )
        for name, ref in [("ref_logits", ref_logits), ("ref_normalized", ref_normalized)]:
            assert ref is None or ref.shape[:2] == (batch, gen_len), (
                f"{name} has shape {tuple(ref.shape)}; expected ({batch}, {gen_len}, ...): "
                f"slice to the generated positions, {name}[:, prefix_len - 1 : -1]"
            )
        assert sample_ids.shape == attention_mask.shape and sample_ids.shape[0] == batch, (
            f"sample_ids {tuple(sample_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be ({batch}, seq)"
        )
        self.sample_ids = sample_ids
        self.attention_mask = attention_mask
        self.logprobs = logprobs
        self.advantages = advantages
        self.values = values
        self.ref_logits = ref_logits
        self.ref_normalized = ref_normalized

    def get_minibatches(
        self,
        num_minibatches: int,
        batches_per_learning_phase: int,
        generator: torch.Generator | None = None,
    ) -> list[ReplayMinibatch]:
        """`batches_per_learning_phase` shuffled passes, each split into `num_minibatches`."""
        batch_size = self.logprobs.shape[0]
        assert batch_size % num_minibatches == 0, (
            f"batch_size {batch_size} is not divisible by num_minibatches {num_minibatches}"
        )
        returns = self.advantages + self.values
        minibatches = []
        for _ in range(batches_per_learning_phase):
            order = torch.randperm(batch_size, generator=generator).to(self.logprobs.device)
            for indices in order.reshape(num_minibatches, -1):
                minibatches.append(
                    ReplayMinibatch(
                        sample_ids=self.sample_ids[indices],
                        attention_mask=self.attention_mask[indices],
                        logprobs=self.logprobs[indices],
                        advantages=self.advantages[indices],
                        returns=returns[indices],
                        ref_logits=None if self.ref_logits is None else self.ref_logits[indices],
                        ref_normalized=(None if self.ref_normalized is None
                                        else self.ref_normalized[indices]),
                    )
                )
        return minibatches
