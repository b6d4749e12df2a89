"""The replay memory: one rollout phase's data, served back as shuffled minibatches.

Stage 5 of the pipeline. Unlike PPO on gym environments there is no `add` (a whole phase is
stored at once), no `dones` (an answer's end is its `response_mask`) and no separate actions (the
generated tokens are the actions). It also carries, row by row, what the models keep for the
learning steps (`kept`: the reference's logits or final residual stream, a frozen trunk's
output), without looking inside. Returns are advantages + values, the targets of the value head.
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
    returns: Float[Tensor, "minibatch gen_len"] | None
    """The value head's targets (None: no value head)."""
    kept: dict[str, Tensor]
    """What the models kept for these rows (`models.RolloutOutputs.kept`), handed back to them."""
    response_mask: Int[Tensor, "minibatch gen_len"] | None = None
    """1 for the tokens the loss reads, 0 for padding (None: every token)."""

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
        values: V(s_t) for each generated token, i.e. `values[:, prefix_len - 1 : -1]` (None:
            no value head).
        kept: what the models keep for each sample (`models.RolloutOutputs.kept`; e.g. the
            reference's logits under "reference"), one row per sample.
        response_mask: 1 for the tokens the loss reads (an answer's real tokens), 0 for padding
            and answers left out (`answers.get_loss_mask`); None: every token.
    """

    def __init__(
        self,
        sample_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
        logprobs: Float[Tensor, "batch gen_len"],
        advantages: Float[Tensor, "batch gen_len"],
        values: Float[Tensor, "batch gen_len"] | None,
        kept: dict[str, Tensor],
        response_mask: Int[Tensor, "batch gen_len"] | None = None,
    ):
        batch, gen_len = logprobs.shape
        for name, tensor in [("advantages", advantages), ("values", values),
                             ("response_mask", response_mask)]:
            assert tensor is None or tensor.shape == (batch, gen_len), (
                f"{name} has shape {tuple(tensor.shape)} but logprobs has {(batch, gen_len)}: "
                "slice values to the generated positions, values[:, prefix_len - 1 : -1]"
            )
        for name, tensor in kept.items():
            assert tensor.shape[0] == batch, (
                f"kept[{name!r}] has {tensor.shape[0]} rows but there are {batch} samples")
        assert sample_ids.shape == attention_mask.shape and sample_ids.shape[0] == batch, (
            f"sample_ids {tuple(sample_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be ({batch}, seq)"
        )
        self.sample_ids = sample_ids
        self.attention_mask = attention_mask
        self.logprobs = logprobs
        self.advantages = advantages
        self.values = values
        self.kept = kept
        self.response_mask = response_mask

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
        returns = None if self.values is None else self.advantages + self.values
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
                        returns=None if returns is None else returns[indices],
                        kept={name: value[indices] for name, value in self.kept.items()},
                        response_mask=None if self.response_mask is None
                        else self.response_mask[indices],
                    )
                )
        return minibatches
