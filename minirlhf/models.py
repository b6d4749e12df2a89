"""The policy and value model: a HookedTransformer with an MLP value head.

Stage 1 of the pipeline. The value head reads the residual stream after the final layernorm
(`ln_final.hook_normalized`), the same vector the unembedding reads, so one forward pass gives
both the next-token logits and a value estimate V(s_t) at every position. This is the ARENA RLHF
design (seed 002); sharing the trunk between policy and value follows Ziegler et al. (2019).
"""

import copy

from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from minirlhf import fast_forward

VALUE_HOOK = "ln_final.hook_normalized"


class TransformerWithValueHead(nn.Module):
    """A HookedTransformer policy plus a value head computed in a hook after the final layernorm.

    Args:
        base_model: any HookedTransformer (pretrained, converted, or tiny and random).
        fast: run forward passes on `minirlhf.fast_forward` (the same logits and values, and
            gradients into the same parameters, without TransformerLens's per-call weight
            re-layout; hooks do not run). Models it does not support use the hooked path.
    """

    def __init__(self, base_model: HookedTransformer, fast: bool = True):
        super().__init__()
        self.base_model = base_model
        self.fast = fast and fast_forward.unsupported_reason(base_model) is None
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
        """One forward pass returning `(logits, values)`."""
        if self.fast:
            weights = fast_forward.get_fast_weights(self.base_model)
            normalized = fast_forward.forward(weights, tokens, attention_mask)
            return fast_forward.unembed(weights.output, normalized), self.get_values(normalized)
        values = None

        def store_values(normalized: Float[Tensor, "batch seq d_model"], hook: HookPoint):
            nonlocal values
            values = self.get_values(normalized)

        logits = self.base_model.run_with_hooks(
            tokens,
            return_type="logits",
            fwd_hooks=[(VALUE_HOOK, store_values)],
            attention_mask=attention_mask,
        )
        assert values is not None, f"the value hook {VALUE_HOOK} did not run"
        return logits, values

    def get_values(
        self, normalized: Float[Tensor, "batch seq d_model"]
    ) -> Float[Tensor, "batch seq"]:
        """The value head on final normalised residuals (what `ln_final.hook_normalized` holds)."""
        # The head may run in float32 while the trunk runs in lower precision.
        return self.value_head(normalized.to(self.value_head[0].weight.dtype)).squeeze(-1)

    def get_heads(
        self, normalized: Float[Tensor, "batch seq d_model"]
    ) -> tuple[Float[Tensor, "batch seq d_vocab"], Float[Tensor, "batch seq"]]:
        """`(logits, values)` from final normalised residuals computed elsewhere (the sampler's,
        `Samples.normalized`): the unembedding and the value head, without running the trunk."""
        logits = fast_forward.unembed(fast_forward.get_output_weights(self.base_model), normalized)
        return logits, self.get_values(normalized)


def get_reference_model(base_model: HookedTransformer) -> HookedTransformer:
    """A frozen copy of the policy at the start of training: the KL penalty's anchor."""
    reference = copy.deepcopy(base_model)
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference
