"""Tests for the critic-free estimators of minirlhf.advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++
and REINFORCE++-baseline) against naive loops over python floats, one group (or one sample) at a
time.

Each oracle check also rejects the classic wrong version, written out in this file: the std
taken over the whole batch instead of the group, the sample left in its own RLOO baseline,
REINFORCE++ normalised per sample instead of over the batch, the KL added instead of subtracted,
REINFORCE++-baseline without its baseline or with GRPO's per-group std.
"""

import statistics
from collections.abc import Callable

import pytest
import torch

from minirlhf.advantages import (
    compute_group_advantages,
    compute_reinforce_pp_advantages,
    compute_reinforce_pp_baseline_advantages,
    compute_rloo_advantages,
    get_zero_std_fraction,
)

GROUP_SIZES = [2, 3, 4]


def make_rewards(seed: int, group_size: int, groups: int = 4) -> torch.Tensor:
    """Rewards whose groups differ in mean *and* spread, so a batch-wide statistic shows."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, groups + 1).repeat_interleave(group_size).float()
    return torch.randn(groups * group_size, generator=generator) * scale + 3 * scale


# ---------------------------------------------------------------- oracles (python floats)


def group_oracle(rewards: torch.Tensor, group_size: int, scale_by_std: bool) -> torch.Tensor:
    """For each prompt (adjacent rows), reward minus the group mean, over the sample std."""
    values = rewards.tolist()
    result = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        mean, std = statistics.mean(group), statistics.stdev(group)
        result += [(r - mean) / (std + 1e-6) if scale_by_std else r - mean for r in group]
    return torch.tensor(result)


def rloo_oracle(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave one out: each sample's baseline averages the *other* rewards of its group."""
    values = rewards.tolist()
    result = []
    for i, reward in enumerate(values):
        start = i - i % group_size
        others = [values[j] for j in range(start, start + group_size) if j != i]
        result.append(reward - sum(others) / len(others))
    return torch.tensor(result)


def reinforce_pp_oracle(rewards, kl, kl_coef, gamma) -> torch.Tensor:
    """Return-to-go of r_t = -kl_coef kl_t (+ the reward at the last token), then normalised with
    the mean and population std of every token of the batch."""
    batch, gen_len = kl.shape
    returns = []
    for b in range(batch):
        for t in range(gen_len):
            total = 0.0
            for s in range(t, gen_len):
                step_reward = -kl_coef * kl[b, s].item() + (rewards[b].item() * (s == gen_len - 1))
                total += gamma ** (s - t) * step_reward
            returns.append(total)
    mean, std = statistics.mean(returns), statistics.pstdev(returns)
    return torch.tensor([(r - mean) / std for r in returns]).reshape(batch, gen_len)


def reinforce_pp_baseline_oracle(rewards, kl, kl_coef, gamma, group_size) -> torch.Tensor:
    """REINFORCE++'s oracle on each reward minus the mean reward of its prompt's group."""
    values = rewards.tolist()
    centred = []
    for i, reward in enumerate(values):
        start = i - i % group_size
        centred.append(reward - statistics.mean(values[start : start + group_size]))
    return reinforce_pp_oracle(torch.tensor(centred), kl, kl_coef, gamma)


def mismatch(result: torch.Tensor, expected: torch.Tensor) -> str | None:
    if result.shape == expected.shape and torch.allclose(result, expected, atol=1e-4):
        return None
    return f"got {result}, expected {expected}"


def group_mismatch(fn: Callable, scale_by_std: bool) -> str | None:
    for seed, group_size in enumerate(GROUP_SIZES):
        rewards = make_rewards(seed, group_size)
        problem = mismatch(fn(rewards, group_size, scale_by_std),
                           group_oracle(rewards, group_size, scale_by_std))
        if problem:
            return f"group_size={group_size}: {problem}"
    return None


def rloo_mismatch(fn: Callable) -> str | None:
    for seed, group_size in enumerate(GROUP_SIZES):
        rewards = make_rewards(seed, group_size)
        problem = mismatch(fn(rewards, group_size), rloo_oracle(rewards, group_size))
        if problem:
            return f"group_size={group_size}: {problem}"
    return None


def reinforce_pp_mismatch(fn: Callable) -> str | None:
    generator = torch.Generator().manual_seed(0)
    for kl_coef, gamma in [(0.1, 1.0), (0.5, 0.9)]:
        rewards, kl = torch.randn(4, generator=generator), torch.rand(4, 5, generator=generator)
        problem = mismatch(fn(rewards, kl.clone(), kl_coef, gamma),
                           reinforce_pp_oracle(rewards, kl, kl_coef, gamma))
        if problem:
            return f"kl_coef={kl_coef}, gamma={gamma}: {problem}"
    return None


def reinforce_pp_baseline_mismatch(fn: Callable) -> str | None:
    generator = torch.Generator().manual_seed(0)
    for seed, group_size in enumerate(GROUP_SIZES):
        rewards = make_rewards(seed, group_size)
        kl = torch.rand(len(rewards), 5, generator=generator)
        for kl_coef, gamma in [(0.1, 1.0), (0.5, 0.9)]:
            problem = mismatch(fn(rewards, kl.clone(), kl_coef, group_size, gamma),
                               reinforce_pp_baseline_oracle(rewards, kl, kl_coef, gamma,
                                                            group_size))
            if problem:
                return f"group_size={group_size}, kl_coef={kl_coef}, gamma={gamma}: {problem}"
    return None


# ---------------------------------------------------------------- wrong implementations


def grpo_std_over_batch(rewards, group_size, scale_by_std):
    """Group means, but the std of the whole batch (ARENA's one-group GRPO, applied to many)."""
    centred = compute_group_advantages(rewards, group_size, scale_by_std=False)
    return centred / (rewards.std() + 1e-6) if scale_by_std else centred


def grpo_mean_over_batch(rewards, group_size, scale_by_std):
    """The whole batch as one group: prompts with higher rewards get positive advantages."""
    return compute_group_advantages(rewards, len(rewards), scale_by_std)


def rloo_sample_in_own_baseline(rewards, group_size):
    """The baseline includes the sample itself: the group mean, i.e. GRPO without the std."""
    return compute_group_advantages(rewards, group_size, scale_by_std=False)


def rloo_baseline_over_batch(rewards, group_size):
    """Leave one out of the whole batch instead of the prompt's group."""
    return compute_rloo_advantages(rewards, len(rewards))


def reinforce_pp_normalised_per_sample(rewards, kl, kl_coef, gamma):
    """The right returns-to-go, normalised over each sample's tokens instead of the batch."""
    step_rewards = -kl_coef * kl
    step_rewards[:, -1] += rewards
    discounts = gamma ** torch.arange(kl.shape[1]).float()
    returns = torch.stack([(step_rewards[:, t:] * discounts[: kl.shape[1] - t]).sum(1)
                           for t in range(kl.shape[1])], dim=1)
    centred = returns - returns.mean(1, keepdim=True)
    return centred / (returns.std(1, correction=0, keepdim=True) + 1e-8)


def reinforce_pp_kl_added(rewards, kl, kl_coef, gamma):
    """The KL penalty with the wrong sign: a reward for drifting from the reference."""
    return compute_reinforce_pp_advantages(rewards, kl, -kl_coef, gamma)


def reinforce_pp_baseline_without_it(rewards, kl, kl_coef, group_size, gamma):
    """Plain REINFORCE++: the batch-wide whitening is the only baseline."""
    return compute_reinforce_pp_advantages(rewards, kl, kl_coef, gamma)


def reinforce_pp_baseline_scaled_per_group(rewards, kl, kl_coef, group_size, gamma):
    """GRPO's advantage (over the group's std) fed to REINFORCE++: a low-spread prompt's
    answers weigh as much as a high-spread one's."""
    scaled = compute_group_advantages(rewards, group_size, scale_by_std=True)
    return compute_reinforce_pp_advantages(scaled, kl, kl_coef, gamma)


# ---------------------------------------------------------------- tests


def test_group_oracles_by_hand():
    """Two prompts, two samples each: rewards (1, 3) and (10, 10)."""
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    # Group 1: mean 2, sample std sqrt(2); group 2: no spread, advantage 0.
    root2 = 2**0.5
    grpo = torch.tensor([-1 / root2, 1 / root2, 0.0, 0.0])
    assert mismatch(group_oracle(rewards, 2, True), grpo) is None
    assert mismatch(compute_group_advantages(rewards, 2), grpo) is None
    assert mismatch(compute_group_advantages(rewards, 2, scale_by_std=False),
                    torch.tensor([-1.0, 1.0, 0.0, 0.0])) is None
    # RLOO: 1 - 3 = -2, 3 - 1 = 2.
    assert mismatch(compute_rloo_advantages(rewards, 2), torch.tensor([-2.0, 2.0, 0, 0])) is None
    # Three samples (0, 3, 6): baselines 4.5, 3, 1.5.
    assert mismatch(compute_rloo_advantages(torch.tensor([0.0, 3.0, 6.0]), 3),
                    torch.tensor([-4.5, 0.0, 4.5])) is None


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_oracle(scale_by_std):
    problem = group_mismatch(compute_group_advantages, scale_by_std)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [grpo_std_over_batch, grpo_mean_over_batch])
def test_group_check_rejects_wrong_versions(wrong):
    assert group_mismatch(wrong, scale_by_std=True) is not None


def test_rloo_matches_oracle():
    problem = rloo_mismatch(compute_rloo_advantages)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [rloo_sample_in_own_baseline, rloo_baseline_over_batch])
def test_rloo_check_rejects_wrong_versions(wrong):
    assert rloo_mismatch(wrong) is not None


def test_reinforce_pp_oracle_by_hand():
    """One sample, two tokens, gamma 1, kl_coef 1: kl (1, 2), reward 5. Per-token rewards -1, 3;
    returns 2, 3 (mean 2.5, population std 0.5): advantages -1, 1."""
    result = compute_reinforce_pp_advantages(torch.tensor([5.0]), torch.tensor([[1.0, 2.0]]), 1.0)
    assert mismatch(result, torch.tensor([[-1.0, 1.0]])) is None
    oracle = reinforce_pp_oracle(torch.tensor([5.0]), torch.tensor([[1.0, 2.0]]), 1.0, 1.0)
    assert mismatch(oracle, torch.tensor([[-1.0, 1.0]])) is None


def test_reinforce_pp_matches_oracle():
    problem = reinforce_pp_mismatch(compute_reinforce_pp_advantages)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [reinforce_pp_normalised_per_sample, reinforce_pp_kl_added])
def test_reinforce_pp_check_rejects_wrong_versions(wrong):
    assert reinforce_pp_mismatch(wrong) is not None


def test_reinforce_pp_leaves_its_kl_argument_alone():
    kl = torch.ones(2, 3)
    compute_reinforce_pp_advantages(torch.tensor([1.0, 2.0]), kl, 0.5)
    assert torch.equal(kl, torch.ones(2, 3))


@pytest.mark.parametrize("fn", [compute_group_advantages, compute_rloo_advantages])
def test_a_group_of_one_is_refused(fn):
    with pytest.raises(AssertionError, match="group_size >= 2"):
        fn(torch.tensor([1.0, 2.0]), 1)


def test_zero_std_fraction_by_hand():
    """Groups (1, 1), (0, 2), (3, 3), (5, 4): two of four have no spread. Grouping by adjacent
    rows matters: the same rewards interleaved, (1, 3), (1, 3), (0, 5), (2, 4), have none."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0, 5.0, 4.0])
    assert get_zero_std_fraction(rewards, 2) == 0.5
    assert get_zero_std_fraction(rewards.reshape(2, 4).T.reshape(-1), 2) == 0.0
    assert get_zero_std_fraction(torch.tensor([2.0, 2.0, 2.0]), 3) == 1.0


def test_reinforce_pp_baseline_by_hand():
    """Two prompts of two samples, one token each, no KL: rewards (1, 3) and (10, 14) centred to
    (-1, 1) and (-2, 2); mean 0, population std sqrt(2.5). Plain REINFORCE++ would rank 10 above
    3; here the worse answer of the easy prompt gets the lowest advantage."""
    result = compute_reinforce_pp_baseline_advantages(
        torch.tensor([1.0, 3.0, 10.0, 14.0]), torch.zeros(4, 1), 0.1, group_size=2)
    expected = torch.tensor([[-1.0], [1.0], [-2.0], [2.0]]) / 2.5**0.5
    assert mismatch(result, expected) is None


def test_reinforce_pp_baseline_matches_oracle():
    problem = reinforce_pp_baseline_mismatch(compute_reinforce_pp_baseline_advantages)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong", [reinforce_pp_baseline_without_it, reinforce_pp_baseline_scaled_per_group])
def test_reinforce_pp_baseline_check_rejects_wrong_versions(wrong):
    assert reinforce_pp_baseline_mismatch(wrong) is not None
