"""The replay memory: one rollout phase's data, served back as shuffled minibatches.

Stage 5 of the pipeline. Unlike PPO on gym environments there is no `add` (a whole phase is
stored at once), no `dones` (every sample has `gen_len` tokens) and no separate actions (the
generated tokens are the actions). It also keeps what the reference model needs to give its
logits back for the exact KL penalty (`ReferenceModel.evaluate`: its logits, or its final residual
stream). Returns are advantages + values, the targets of the value head.
"""

from dataclasses import dataclass

import torch
from einops import rearrange
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
    ref_outputs: Float[Tensor, "minibatch gen_len d_ref"]
    """What the reference model kept: its logits, or its final residual stream
    (`ReferenceModel.get_logits` turns either into its logits)."""
    trunk_residual: Float[Tensor, "minibatch seq d_model"] | None = None
    """The residual stream entering the first trainable block (a frozen trunk's output), or
    None when every block trains."""

    @property
    def prefix_len(self) -> int:
        """Position of the first generated token."""
        return self.sample_ids.shape[1] - self.logprobs.shape[1]


class ReplayMemory:
    """Stores one rollout phase (all tensors indexed by sample along dim 0).

    Args:
        sample_ids: prompt + generated tokens.
        attention_mask: 1 for real tokens, 0 for left padding.
        logprobs: log-probs of the generated tokens under the policy that sampled them.
        advantages: one per generated token.
        values: V(s_t) for each generated token, i.e. `values[:, prefix_len - 1 : -1]`.
        ref_outputs: what the reference model keeps for each generated token: its logits
            (d_ref = d_vocab), or its final residual stream (d_ref = d_model).
        trunk_residual: with a frozen trunk, its output at every position, computed once in the
            rollout and reused by every learning step (None: no frozen trunk).
    """

    def __init__(
        self,
        sample_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
        logprobs: Float[Tensor, "batch gen_len"],
        advantages: Float[Tensor, "batch gen_len"],
        values: Float[Tensor, "batch gen_len"],
        ref_outputs: Float[Tensor, "batch gen_len d_ref"],
        trunk_residual: Float[Tensor, "batch seq d_model"] | None = None,
    ):
        batch, gen_len = logprobs.shape
        for name, tensor in [("advantages", advantages), ("values", values)]:
            assert tensor.shape == (batch, gen_len), (
                f"{name} has shape {tuple(tensor.shape)} but logprobs has {(batch, gen_len)}: "
                "slice values to the generated positions, values[:, prefix_len - 1 : -1]"
            )
        assert ref_outputs.shape[:2] == (batch, gen_len), (
            f"ref_outputs has shape {tuple(ref_outputs.shape)}; expected ({batch}, {gen_len}, "
            "...): slice to the generated positions, [:, prefix_len - 1 : -1]"
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
        self.ref_outputs = ref_outputs
        self.trunk_residual = trunk_residual

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
            for indices in rearrange(order, "(n size) -> n size", n=num_minibatches):
                minibatches.append(
                    ReplayMinibatch(
                        sample_ids=self.sample_ids[indices],
                        attention_mask=self.attention_mask[indices],
                        logprobs=self.logprobs[indices],
                        advantages=self.advantages[indices],
                        returns=returns[indices],
                        ref_outputs=self.ref_outputs[indices],
                        trunk_residual=None if self.trunk_residual is None
                        else self.trunk_residual[indices],
                    )
                )
        return minibatches
