"""Steering: a vector added to the residual stream after a block, as a hook the fast path runs too.

Part of the model layer (stages 1-2), beside `runtime.lora`. A user's hooks run only on
TransformerLens's own forward (`runtime.fast_path` skips them), so sampling a steered model used
to fall back to the slow path. `ResidualShift` is the one kind of user hook the fast path also
computes: attached at `blocks.{layer}.hook_resid_post`, it adds `scales[c] * direction` to every
position of copy c of the batch (rows c * n .. (c + 1) * n - 1 of a batch of len(scales) * n
rows), whichever forward runs. `minirlhf.inspection`'s `steering` and `steering_grid` use it.
"""

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint


class ResidualShift:
    """A forward hook adding `scales[c] * direction` to copy c of the batch, at every position."""

    def __init__(self, scales: Float[Tensor, " copies"], direction: Float[Tensor, " d_model"]):
        self.scales, self.direction = scales.detach(), direction.detach()

    def offsets(self, like: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch 1 d_model"]:
        """Each row's shift, in `like`'s dtype and device (its batch: whole copies)."""
        batch, copies = like.shape[0], len(self.scales)
        if batch % copies:
            raise ValueError(f"A batch of {batch} rows does not split into the {copies} copies "
                             "this steering hook was made for: pass len(settings) * n rows.")
        per_row = self.scales.to(like).repeat_interleave(batch // copies)
        return (per_row[:, None] * self.direction.to(like))[:, None]

    def __call__(self, residual: Float[Tensor, "batch seq d_model"], hook: HookPoint
                 ) -> Float[Tensor, "batch seq d_model"]:
        return residual + self.offsets(residual)


def get_shifts(model: HookedTransformer) -> dict[int, list[ResidualShift]]:
    """The `ResidualShift` hooks attached to the model, by the block they follow."""
    shifts = {}
    for layer, block in enumerate(model.blocks):
        found = [handle.user_hook for handle in block.hook_resid_post.fwd_hooks
                 if isinstance(handle.user_hook, ResidualShift)]
        if found:
            shifts[layer] = found
    return shifts
