"""What a rollout phase logs: pure functions of its rewards, the models' outputs and advantages.

Every metric is explained in docs/metrics.md. Statistics are over the global batch (every
data-parallel process's rows), so every process logs the same numbers.
"""

from jaxtyping import Float
from torch import Tensor

from minirlhf.advantages import get_zero_std_fraction
from minirlhf.models import RolloutOutputs


def explained_variance(
    values: Float[Tensor, "batch gen_len"], returns: Float[Tensor, "batch gen_len"]
) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect value head, <= 0 a useless one;
    NaN when the returns (almost) do not vary, where the ratio means nothing."""
    var_returns = returns.var(correction=0)
    if var_returns <= 1e-8 * max(1.0, returns.abs().max().item() ** 2):
        return float("nan")
    return (1 - (returns - values).var(correction=0) / var_returns).item()


def get_rollout_metrics(
    rewards: Float[Tensor, " batch"], outputs: RolloutOutputs,
    advantages: Float[Tensor, "batch gen_len"], kl_estimator: str, group_size: int,
) -> dict[str, float]:
    """The reward, the KL (exact, and the sampled estimate that trains, if one does), the
    entropy, the share of groups with one reward for all (group_size > 1) and how well the
    value head predicts the returns (with a value head)."""
    metrics = {
        "charts/reward_mean": rewards.mean().item(),
        "charts/reward_std": rewards.std(correction=0).item(),
        "charts/kl": outputs.exact_kl.mean().item(),
        "charts/entropy": outputs.entropy.mean().item(),
    }
    if kl_estimator != "exact":
        metrics[f"charts/kl_{kl_estimator}"] = outputs.kl.mean().item()
    if group_size > 1:
        metrics["charts/frac_reward_zero_std"] = get_zero_std_fraction(rewards, group_size)
    if outputs.values is not None:
        metrics["losses/explained_variance"] = explained_variance(
            outputs.values, advantages + outputs.values)
    return metrics


def get_ratio_metrics(
    logprobs: Float[Tensor, "minibatch gen_len"], mb_logprobs: Float[Tensor, "minibatch gen_len"],
    clip_coef: float,
) -> dict[str, float]:
    """How far a learning step's policy is from the one that sampled: Schulman's low-variance
    estimate of KL(old || new), (r - 1) - log r, and the share of tokens whose ratio is clipped."""
    log_ratio = (logprobs - mb_logprobs).detach()
    ratio = log_ratio.exp()
    return {"losses/approx_kl": ((ratio - 1) - log_ratio).mean().item(),
            "losses/clip_fraction": ((ratio - 1).abs() > clip_coef).float().mean().item()}
