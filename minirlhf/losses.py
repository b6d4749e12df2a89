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

import numpy as np
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


def calc_kl_k3_is(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"],
    old_logprobs: Float[Tensor, "batch gen_len"],
) -> Float[Tensor, "batch gen_len"]:
    """k3 times the importance ratio pi(x) / mu(x) of the current policy to the one that sampled
    x (`old_logprobs`), the ratio NOT detached: unbiased for the KL in value and, as a loss, in
    gradient, on-policy (ratio 1, gradient kept) and off-policy (x ~ mu) alike. Plain k3's
    gradient is the reverse KL's, and with the ratio detached so is this one's.

    DeepSeek-V3.2 (2025, arXiv 2512.02556); TRL's `GRPOConfig.use_bias_correction_kl`
    multiplies its k3 by its (undetached) token ratio `coef_1` the same way."""
    return (logprobs - old_logprobs).exp() * calc_kl_k3(logprobs, ref_logprobs)


KL_ESTIMATORS = {"k1": calc_kl_k1, "k2": calc_kl_k2, "k3": calc_kl_k3}
"""The sampled estimators by the name `RLHFArgs.kl_estimator` gives them (`k3_is`, which also
reads the sampling policy's log-probs, is chosen in `calc_kl`)."""


def calc_kl(
    estimator: str,
    logprobs: Float[Tensor, "batch gen_len"],
    logits: Float[Tensor, "batch gen_len d_vocab"],
    ref_logits: Float[Tensor, "batch gen_len d_vocab"],
    gen_tokens: Int[Tensor, "batch gen_len"],
    old_logprobs: Float[Tensor, "batch gen_len"] | None = None,
) -> Float[Tensor, "batch gen_len"]:
    """KL(policy || reference) at each generated position by `estimator` (`RLHFArgs.kl_estimator`),
    the one place an estimator is chosen: "exact" sums over the vocabulary (`calc_exact_kl`);
    "k1", "k2", "k3" read only the sampled tokens' log-probs (`KL_ESTIMATORS`); "k3_is" also
    the sampling policy's (`calc_kl_k3_is`).

    Args:
        logprobs: the policy's log-probs of `gen_tokens` (computed once, by the caller).
        old_logprobs: the log-probs of the policy that sampled `gen_tokens` (the rollout's), for
            "k3_is"; None: the policy itself sampled them (on-policy: `logprobs`, detached).
    """
    if estimator == "exact":
        return calc_exact_kl(logits, ref_logits)
    ref_logprobs = get_gen_logprobs(ref_logits, gen_tokens)
    if estimator == "k3_is":
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        return calc_kl_k3_is(logprobs, ref_logprobs, old)
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def calc_entropy(
    logits: Float[Tensor, "batch gen_len d_vocab"],
) -> Float[Tensor, "batch gen_len"]:
    """The entropy of the policy at each generated position."""
    logprobs = logits.float().log_softmax(dim=-1)
    probs = logprobs.exp()
    # 0 * log 0 is 0: masked (-inf) logits add nothing, with finite gradients.
    return -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(dim=-1)


def calc_entropy_bonus(
    logits: Float[Tensor, "minibatch gen_len d_vocab"], ent_coef: float,
    response_mask: Int[Tensor, "minibatch gen_len"] | None = None,
    aggregation: str = "token_mean",
) -> Float[Tensor, ""]:
    """ent_coef times the mean entropy of the policy at the generated positions (`aggregate`d
    over the real response tokens). Added."""
    return ent_coef * aggregate(calc_entropy(logits), response_mask, aggregation)


def calc_value_function_loss(
    values: Float[Tensor, "minibatch gen_len"],
    mb_returns: Float[Tensor, "minibatch gen_len"],
    vf_coef: float,
    response_mask: Int[Tensor, "minibatch gen_len"] | None = None,
    aggregation: str = "token_mean",
) -> Float[Tensor, ""]:
    """vf_coef times half the mean squared error of the values against the returns. Subtracted."""
    return 0.5 * vf_coef * aggregate((values - mb_returns).pow(2), response_mask, aggregation)


def calc_clipped_surrogate_objective(
    logprobs: Float[Tensor, "minibatch gen_len"],
    mb_logprobs: Float[Tensor, "minibatch gen_len"],
    mb_advantages: Float[Tensor, "minibatch gen_len"],
    clip_coef: float,
    clip_coef_high: float | None = None,
    response_mask: Int[Tensor, "minibatch gen_len"] | None = None,
    aggregation: str = "token_mean",
) -> Float[Tensor, ""]:
    """PPO's clipped surrogate objective, averaged over the real response tokens (`aggregate`).
    Added. The ratio is clipped to [1 - clip_coef, 1 + clip_coef_high] (DAPO's clip-higher,
    Yu et al. 2025; None: 1 + clip_coef).

    The advantages are used as given: the learning loop whitens them first where the estimator
    asks for it (`whiten`), as CleanRL does."""
    ratio = (logprobs - mb_logprobs).exp()
    high = clip_coef if clip_coef_high is None else clip_coef_high
    unclipped = ratio * mb_advantages
    clipped = ratio.clamp(1 - clip_coef, 1 + high) * mb_advantages
    return aggregate(torch.minimum(unclipped, clipped), response_mask, aggregation)


AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
"""How a per-token loss becomes one number when answers have different lengths."""


def aggregate(
    values: Float[Tensor, "batch gen_len"],
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
    how: str = "token_mean",
) -> Float[Tensor, ""]:
    """The mean of a per-token quantity over the real response tokens (mask 1), by `how`:

    - "token_mean": every real token of the batch counts once (DAPO, Yu et al. 2025);
    - "sequence_mean": each answer's mean over its own tokens, then the mean over answers
      (the original GRPO): a token of a short answer weighs more than one of a long answer;
    - "constant": the sum over real tokens divided by batch x gen_len, a constant (Dr. GRPO,
      Liu et al. 2025).

    Padding never counts, and gets exactly zero gradient. Without a mask (every answer gen_len
    tokens long) all three are the plain mean."""
    if response_mask is None:
        return values.mean()
    real = response_mask.bool()
    total = torch.where(real, values, 0.0)
    match how:
        case "token_mean":
            return total.sum() / real.sum().clamp(min=1)
        case "sequence_mean":
            return (total.sum(dim=-1) / real.sum(dim=-1).clamp(min=1)).mean()
        case "constant":
            return total.sum() / real.numel()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}.")


def check_finite(objective: Float[Tensor, ""], stats: dict[str, float]):
    """Stop before a non-finite objective reaches the weights, naming the term that broke."""
    if torch.isfinite(objective):
        return
    broken = [key for key, value in stats.items() if not np.isfinite(value)]
    raise FloatingPointError(
        f"The objective is {objective.item()} ({', '.join(broken)} not finite), so this step "
        "would put NaN into the weights. Usual causes: rewards far from order 1 without "
        "normalize_reward, or a learning rate too high for this model."
    )
