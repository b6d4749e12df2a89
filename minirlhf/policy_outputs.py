"""What a learning step reads off the policy and the reference: per-token log-probs, values,
KL and entropy, with gradients, never holding a minibatch x gen_len x d_vocab tensor.

Stage 6 of the pipeline, between the models (`models`) and the objective's terms (`losses`):
the policy's final residual stream is unembedded a few positions at a time and each chunk is
reduced to its per-token quantities at once (`token_stats.get_token_stats`), so the trainer
never sees logits. The numbers are those of `losses.get_gen_logprobs`, `losses.calc_kl` and
`losses.calc_entropy` on `TransformerWithValueHead.forward_generated`'s logits.
"""

from typing import NamedTuple

from jaxtyping import Float, Int
from torch import Tensor

from minirlhf.models import ReferenceModel, TransformerWithValueHead
from minirlhf.token_stats import calc_kl_from_stats, get_token_stats


class PolicyOutputs(NamedTuple):
    """What a learning step reads off the policy (with gradients) and the reference."""

    logprobs: Float[Tensor, "minibatch gen_len"]
    values: Float[Tensor, "minibatch gen_len"] | None
    kl: Float[Tensor, "minibatch gen_len"]
    """KL(policy || reference) of each token by the run's estimator (`calc_kl_from_stats`)."""
    entropy: Float[Tensor, "minibatch gen_len"]


def get_policy_outputs(
    policy: TransformerWithValueHead, reference: ReferenceModel,
    sample_ids: Int[Tensor, "minibatch seq"], attention_mask: Int[Tensor, "minibatch seq"],
    prefix_len: int, kept: dict[str, Tensor], kl_estimator: str,
    old_logprobs: Float[Tensor, "minibatch gen_len"] | None = None,
) -> PolicyOutputs:
    """The policy's log-probs, values and entropy and its KL to the reference (by
    `kl_estimator`) at the generated positions of a minibatch, differentiable.

    Args:
        kept: what the models kept for these rows (`ReplayMinibatch.kept`).
        old_logprobs: the rollout's log-probs of the sampled tokens ("k3_is"'s sampler).
    """
    get_logits, values = policy.get_generated(sample_ids, attention_mask, prefix_len, kept)
    stats = get_token_stats(get_logits, sample_ids[:, prefix_len:],
                            reference.get_chunk_logits(kept))
    kl = calc_kl_from_stats(kl_estimator, stats, old_logprobs)
    return PolicyOutputs(stats.logprobs, values, kl, stats.entropy)
