"""Held-out evaluation of answers a program checks: pass@1 (greedy) and pass@k (sampled).

Beside the training loop: every `eval_every` phases the trainer answers each held-out prompt
once greedily and `eval_pass_k` times by sampling (`RLHFTrainer.evaluate_held_out`); these pure
functions turn the rewards into the numbers logged. A pass is a reward of at least
`PASS_REWARD` (a task checker gives 1 for an exact answer only, docs/tasks.md). pass@k is
Chen et al. 2021's unbiased estimator ("Evaluating Large Language Models Trained on Code",
eq. 1): with n answers of which c pass, the chance that k drawn without replacement hold a
pass, 1 - C(n - c, k) / C(n, k).
"""

import math

from jaxtyping import Float
from torch import Tensor

from minirlhf.advantages import get_zero_std_fraction

PASS_REWARD = 1.0
"""The least reward that counts as a pass."""


def calc_pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt from `n` answers of which `c` passed (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:  # every draw of k answers holds a pass
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def get_pass_metrics(
    greedy_rewards: Float[Tensor, " group"], sampled_rewards: Float[Tensor, "group group_size"],
    k: int,
) -> dict[str, float]:
    """The held-out metrics of answers a program checks.

    Args:
        greedy_rewards: the reward of each held-out prompt's greedy answer.
        sampled_rewards: the rewards of n >= k sampled answers to each of the same prompts.
        k: the k of pass@k.

    Returns:
        eval/pass_at_1 (greedy), eval/pass_at_k (mean over prompts), eval/pass_rate_sampled
        (the share of sampled answers that pass: the mean of the unbiased pass@1), and
        eval/frac_reward_zero_std (the share of prompts whose sampled answers all got the same
        reward: a GRPO group of them would teach nothing).
    """
    n = sampled_rewards.shape[1]
    passed = sampled_rewards >= PASS_REWARD
    pass_at_k = [calc_pass_at_k(n, c, k) for c in passed.sum(dim=1).tolist()]
    return {"eval/pass_at_1": (greedy_rewards >= PASS_REWARD).float().mean().item(),
            "eval/pass_at_k": sum(pass_at_k) / len(pass_at_k),
            "eval/pass_rate_sampled": passed.float().mean().item(),
            "eval/frac_reward_zero_std": get_zero_std_fraction(sampled_rewards.flatten(), n)}
