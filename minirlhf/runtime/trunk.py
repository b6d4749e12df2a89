"""The frozen trunk: blocks at the bottom of a model that do not train, run once and reused.

When only the top blocks train (`trainable_layers`), the blocks below compute the same residual
stream for a text at every step, so PPO computes it once per rollout (and every learning step
on those samples starts from it), and DPO and the reward model once per text (`TrunkCache`).
A backward pass then also stops at the lowest trainable block.
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from minirlhf.runtime import fast_path as fast


class Trunk(NamedTuple):
    """A frozen trunk's output: the residual stream entering block `layer`, at every position."""

    layer: int
    residual: Float[Tensor, "batch seq d_model"]


def mask_or_none(
    attention_mask: Int[Tensor, "batch seq"] | None,
) -> Int[Tensor, "batch seq"] | None:
    """The mask only when there is padding: unpadded batches take the faster causal path."""
    return None if attention_mask is None or bool(attention_mask.all()) else attention_mask


@torch.no_grad()
def get_trunk(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    layer: int,
    fast_path: bool,
) -> Trunk:
    """What the blocks below `layer` compute."""
    attention_mask = mask_or_none(attention_mask)
    if fast.use_fast_path(model, fast_path):
        weights = fast.get_fast_weights(model, to_layer=layer)
        residual = fast.forward(weights, tokens, attention_mask, layers=slice(None, layer))
    else:
        residual = model(tokens, attention_mask=attention_mask, stop_at_layer=layer)
    return Trunk(layer, residual)


class TrunkCache:
    """The trunk's output per text, computed the first time a text is asked for.

    For right-padded batches: row i's residual stream at its real positions [0, length) does not
    depend on the padding after it, so it is stored per token sequence (576 floats, 2.3 KB, per
    token for SmolLM2) and laid out again for any batch. A policy and its reference share the
    frozen blocks, so one cache serves both.
    """

    def __init__(self, layer: int, fast_path: bool = True):
        self.layer, self.fast_path = layer, fast_path
        self.residuals: dict[tuple[int, ...], Float[Tensor, "seq d_model"]] = {}

    def __call__(
        self, model: HookedTransformer, tokens: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"],
    ) -> Trunk:
        lengths = attention_mask.sum(-1).tolist()
        keys = [self.key(row[:n]) for row, n in zip(tokens, lengths)]
        missing = [i for i, key in enumerate(keys) if key not in self.residuals]
        if missing:
            rows = torch.tensor(missing, device=tokens.device)
            trunk = get_trunk(model, tokens[rows], attention_mask[rows], self.layer,
                              self.fast_path)
            for i, residual in zip(missing, trunk.residual):
                self.residuals[keys[i]] = residual[: lengths[i]].clone()
        residual = torch.nn.utils.rnn.pad_sequence([self.residuals[key] for key in keys],
                                                   batch_first=True)
        # Pad to the batch's own width, so the result lines up with `tokens`.
        return Trunk(self.layer, torch.nn.functional.pad(
            residual, (0, 0, 0, tokens.shape[1] - residual.shape[1])))

    @staticmethod
    def key(tokens: Int[Tensor, " seq"]) -> tuple[int, ...]:
        """What a stored output is found by: the whole unpadded token sequence."""
        return tuple(tokens.tolist())
