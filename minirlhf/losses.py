"""The RLHF objective: four terms computed on a minibatch, each a pure function.

Stage 6 of the pipeline. One sign convention throughout: the trainer *maximises*

    objective = clipped_surrogate - value_loss + entropy_bonus - kl_penalty

(AdamW with maximize=True), as in the ARENA exercises. Each docstring says whether its term is
added or subtracted. All functions take logits at the *generated* positions only: the logits at
position `prefix_len - 1 + t` predict generated token t, so callers slice
`logits[:, prefix_len - 1 : -1]`. Temperature is applied by the caller (logits / temperature)
before these functions, so the terms describe the distribution the tokens were sampled from.

References: Schulman et al. 2017 (PPO), Ziegler et al. 2019 and Stiennon et al. 2020 (the KL
penalty against a reference model), Schulman 2020 "Approximating KL Divergence" (the sampled
estimators k1, k2, k3), Huang et al. 2024 "The N Implementation Details of RLHF with PPO"
(temperature, advantage normalisation).
"""

import warnings

import torch
from eindex import eindex
from jaxtyping import Float, Int
from torch import Tensor

# eindex-callum indexes with a list internally, which torch >= 2.9 warns about on every call.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence", module="eindex")


def get_logprobs(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    prefix_len: int | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """Log-probability the model gave to each token that follows, from position `prefix_len` on.

    logits[:, s] predicts tokens[:, s+1], so the result has `seq - prefix_len` columns: one per
    generated token (or `seq - 1` columns, every next token, when prefix_len is None).
    """
    if prefix_len is not None:
        logits = logits[:, prefix_len - 1 :]
        tokens = tokens[:, prefix_len - 1 :]
    logprobs = logits.log_softmax(dim=-1)
    return eindex(logprobs, tokens, "b s [b s+1]")


def get_gen_logprobs(
    gen_logits: Float[Tensor, "batch gen_len d_vocab"], gen_tokens: Int[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """Log-probability of each generated token under the logits of the state that chose it:
    `gen_logits[:, t]` (position `prefix_len - 1 + t`) chose `gen_tokens[:, t]`."""
    return eindex(gen_logits.log_softmax(dim=-1), gen_tokens, "b s [b s]")


def calc_exact_kl(
    logits: Float[Tensor, "batch gen_len d_vocab"],
    ref_logits: Float[Tensor, "batch gen_len d_vocab"],
) -> Float[Tensor, "batch gen_len"]:
    """The exact KL(policy || reference) at each generated position, summed over the vocabulary.

    From log-softmaxes, so large logits cannot overflow; clamped at 0 to remove negative rounding
    error (a KL is never negative).
    """
    logprobs = logits.float().log_softmax(dim=-1)
    ref_logprobs = ref_logits.float().log_softmax(dim=-1)
    probs = logprobs.exp()
    # A token the policy gives probability 0 (a masked, -inf logit) adds nothing, even where the
    # reference's is 0 too. Zeroing its log-probs before the product (rather than its term after)
    # keeps the gradient finite: 0 * (-inf) would make it NaN.
    impossible = probs == 0
    log_ratio = logprobs.masked_fill(impossible, 0.0) - ref_logprobs.masked_fill(impossible, 0.0)
    return (probs * log_ratio).sum(dim=-1).clamp(min=0.0)


def calc_kl_penalty(
    logits: Float[Tensor, "minibatch gen_len d_vocab"],
    ref_logits: Float[Tensor, "minibatch gen_len d_vocab"],
    kl_coef: float,
) -> Float[Tensor, ""]:
    """kl_coef times the mean exact KL(policy || reference) over the vocabulary (`calc_exact_kl`),
    not estimated from the sampled token. Subtracted."""
    return kl_coef * calc_exact_kl(logits, ref_logits).mean()


# Sampled KL estimators (Schulman 2020, "Approximating KL Divergence"). Each reads only the
# log-probs of the sampled tokens x ~ policy, with r = p_ref(x) / p(x). Their *values* average to
# (k1, k3) the KL or (k2) E[(log r)^2] / 2; as losses their *gradients* are not the KL's gradient
# (docs/critic_free.md shows it).


def calc_kl_k1(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """k1 = -log r = log p(x) - log p_ref(x): unbiased, high variance, negative for some x."""
    return logprobs - ref_logprobs


def calc_kl_k2(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """k2 = (log r)^2 / 2: never negative, low variance, biased (close to the KL when p ~ p_ref)."""
    return 0.5 * (ref_logprobs - logprobs).pow(2)


def calc_kl_k3(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """k3 = (r - 1) - log r: unbiased and never negative (log r <= r - 1)."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - 1 - log_ratio


KL_ESTIMATORS = {"k1": calc_kl_k1, "k2": calc_kl_k2, "k3": calc_kl_k3}
"""The sampled estimators by the name `RLHFArgs.kl_estimator` gives them."""


def calc_kl(
    estimator: str,
    logprobs: Float[Tensor, "batch gen_len"],
    logits: Float[Tensor, "batch gen_len d_vocab"],
    ref_logits: Float[Tensor, "batch gen_len d_vocab"],
    gen_tokens: Int[Tensor, "batch gen_len"],
) -> Float[Tensor, "batch gen_len"]:
    """KL(policy || reference) at each generated position by `estimator` (`RLHFArgs.kl_estimator`),
    the one place an estimator is chosen: "exact" sums over the vocabulary (`calc_exact_kl`);
    "k1", "k2", "k3" read only the sampled tokens' log-probs (`KL_ESTIMATORS`).

    Args:
        logprobs: the policy's log-probs of `gen_tokens` (computed once, by the caller).
    """
    if estimator == "exact":
        return calc_exact_kl(logits, ref_logits)
    return KL_ESTIMATORS[estimator](logprobs, get_gen_logprobs(ref_logits, gen_tokens))


def calc_entropy(
    logits: Float[Tensor, "batch gen_len d_vocab"],
) -> Float[Tensor, "batch gen_len"]:
    """The entropy of the policy at each generated position."""
    logprobs = logits.float().log_softmax(dim=-1)
    probs = logprobs.exp()
    # 0 * log 0 is 0: masked (-inf) logits add nothing, with finite gradients.
    return -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(dim=-1)


def calc_entropy_bonus(
    logits: Float[Tensor, "minibatch gen_len d_vocab"], ent_coef: float
) -> Float[Tensor, ""]:
    """ent_coef times the mean entropy of the policy at the generated positions. Added."""
    return ent_coef * calc_entropy(logits).mean()


def calc_value_function_loss(
    values: Float[Tensor, "minibatch gen_len"],
    mb_returns: Float[Tensor, "minibatch gen_len"],
    vf_coef: float,
) -> Float[Tensor, ""]:
    """vf_coef times half the mean squared error of the values against the returns. Subtracted."""
    return 0.5 * vf_coef * (values - mb_returns).pow(2).mean()


def calc_clipped_surrogate_objective(
    logprobs: Float[Tensor, "minibatch gen_len"],
    mb_logprobs: Float[Tensor, "minibatch gen_len"],
    mb_advantages: Float[Tensor, "minibatch gen_len"],
    clip_coef: float,
) -> Float[Tensor, ""]:
    """PPO's clipped surrogate objective, mean over the minibatch (every sample has gen_len
    tokens, so token-mean, sequence-mean and Dr. GRPO's constant normaliser agree). Added.

    The advantages are used as given: the learning loop whitens them first where the estimator
    asks for it (`whiten`), as CleanRL does."""
    ratio = (logprobs - mb_logprobs).exp()
    unclipped = ratio * mb_advantages
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * mb_advantages
    return torch.minimum(unclipped, clipped).mean()

