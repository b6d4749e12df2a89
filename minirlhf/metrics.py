"""What a rollout phase logs: pure functions of its rewards, the models' outputs and advantages.

Every metric is explained in docs/metrics.md. Statistics are over the global batch (every
data-parallel process's rows), so every process logs the same numbers. Per-token means are over
the answers' real tokens (padding after an answer's end never counts).
"""

from jaxtyping import Float, Int
from torch import Tensor

from minirlhf.advantages import get_zero_std_fraction
from minirlhf.answers import get_lengths
from minirlhf.fluency import get_fluency_metrics
from minirlhf.losses import aggregate
from minirlhf.models import GlobalBatch


def explained_variance(
    values: Float[Tensor, "batch gen_len"], returns: Float[Tensor, "batch gen_len"],
    response_mask: Int[Tensor, "batch gen_len"] | None = None,
) -> float:
    """1 - Var(returns - values) / Var(returns) over the real tokens: 1 is a perfect value head,
    <= 0 a useless one; NaN when the returns (almost) do not vary, where the ratio means nothing."""
    if response_mask is not None:
        values, returns = values[response_mask.bool()], returns[response_mask.bool()]
    var_returns = returns.var(correction=0)
    if var_returns <= 1e-8 * max(1.0, returns.abs().max().item() ** 2):
        return float("nan")
    return (1 - (returns - values).var(correction=0) / var_returns).item()


def get_rollout_metrics(
    batch: GlobalBatch, advantages: Float[Tensor, "batch gen_len"], kl_estimator: str,
    group_size: int, kl_coef: float,
) -> dict[str, float]:
    """The reward, the KL (exact, per token and per answer, and the sampled estimate that trains,
    if one does) and its coefficient, the entropy, the share of groups with one reward for all
    (group_size > 1), how well the value head predicts the returns (with a value head), the
    answers' lengths (`get_answer_metrics`) and how they read (`fluency.get_fluency_metrics`, on
    the answers alone, or the whole texts when the batch has no answers)."""
    outputs, mask = batch.outputs, batch.response_mask
    gen_len = outputs.exact_kl.shape[1]
    metrics = {
        "charts/reward_mean": batch.rewards.mean().item(),
        "charts/reward_std": batch.rewards.std(correction=0).item(),
        "charts/kl": aggregate(outputs.exact_kl, mask).item(),
        # The mean over answers of each one's summed KL: the constant aggregation times gen_len.
        "charts/kl_per_answer": aggregate(outputs.exact_kl, mask, "constant").item() * gen_len,
        "charts/kl_coef": kl_coef,
        "charts/entropy": aggregate(outputs.entropy, mask).item(),
    }
    if kl_estimator != "exact":
        metrics[f"charts/kl_{kl_estimator}"] = aggregate(outputs.kl, mask).item()
    if group_size > 1:
        metrics["charts/frac_reward_zero_std"] = get_zero_std_fraction(batch.rewards, group_size)
    if outputs.values is not None:
        metrics["losses/explained_variance"] = explained_variance(
            outputs.values, advantages + outputs.values, mask)
    answers = batch.texts if batch.responses is None else batch.responses
    return metrics | get_answer_metrics(batch) | get_fluency_metrics(answers)


def get_answer_metrics(batch: GlobalBatch) -> dict[str, float]:
    """The answers' mean and longest length, the share truncated (never ended: only when answers
    can end), and the largest and mean gap between the log-prob the sampler drew each real token
    from and the rollout's (0 in float32 on the fast path; bfloat16 rounds the two differently)."""
    gen_len = batch.outputs.logprobs.shape[1]
    lengths = get_lengths(batch.response_mask, len(batch.rewards), gen_len).float()
    metrics = {"charts/response_length": lengths.mean().item(),
               "charts/response_length_max": lengths.max().item()}
    if batch.ended is not None:
        metrics["charts/frac_truncated"] = 1.0 - batch.ended.float().mean().item()
    if batch.sampler_logprobs is not None:
        gap = (batch.sampler_logprobs - batch.outputs.logprobs).abs()
        real = gap if batch.response_mask is None else gap[batch.response_mask.bool()]
        metrics |= {"charts/logprob_gap_mean": real.mean().item(),
                    "charts/logprob_gap_max": real.max().item()}
    return metrics


def get_ratio_metrics(
    logprobs: Float[Tensor, "minibatch gen_len"], mb_logprobs: Float[Tensor, "minibatch gen_len"],
    clip_coef: float, response_mask: Int[Tensor, "minibatch gen_len"] | None = None,
) -> dict[str, float]:
    """How far a learning step's policy is from the one that sampled, over the real tokens:
    Schulman's low-variance estimate of KL(old || new), (r - 1) - log r, and the share of tokens
    whose ratio is clipped."""
    log_ratio = (logprobs - mb_logprobs).detach()
    ratio = log_ratio.exp()
    clipped = ((ratio - 1).abs() > clip_coef).float()
    return {"losses/approx_kl": aggregate((ratio - 1) - log_ratio, response_mask).item(),
            "losses/clip_fraction": aggregate(clipped, response_mask).item()}
