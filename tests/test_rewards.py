"""Tests for minirlhf.rewards: reward functions, their checks at the stage boundary, normalisation.

Oracles are numbers worked by hand and population statistics computed with python floats; each
check also rejects a plausible wrong implementation (the seed's unbiased std, a `get_rewards` that
trusts the reward function).
"""

import math
import statistics
from collections.abc import Callable

import pytest
import torch

from minirlhf.rewards import get_rewards, normalize_reward, reward_fn_char_count

SAMPLES = ["This is. A test.", "This is", "This is..."]


# ---------------------------------------------------------------- reward_fn_char_count


def test_char_count_by_hand():
    assert reward_fn_char_count(SAMPLES).tolist() == [2.0, 0.0, 3.0]
    assert reward_fn_char_count(["a!b!!", "?"], char="!").tolist() == [3.0, 0.0]
    assert reward_fn_char_count(SAMPLES).dtype == torch.float32


# ---------------------------------------------------------------- normalize_reward


def normalization_problem(fn: Callable) -> str | None:
    """None if fn gives mean 0, population std 1 (python-float oracle), and zeros, not NaN, when
    there is no spread; else the first case it gets wrong."""
    # By hand: (1, 2, 3, 4) has mean 2.5 and population std sqrt(1.25).
    by_hand = fn(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    expected = [(x - 2.5) / math.sqrt(1.25) for x in [1, 2, 3, 4]]
    if not torch.allclose(by_hand, torch.tensor(expected), atol=1e-4):
        return f"(1, 2, 3, 4) gave {by_hand.tolist()}, expected {expected}"
    rewards = torch.randn(37, generator=torch.Generator().manual_seed(0)) * 5 + 3
    result = fn(rewards).tolist()
    mean, std = statistics.fmean(result), statistics.pstdev(result)
    if abs(mean) > 1e-5 or abs(std - 1) > 1e-4:
        return f"random rewards: mean {mean}, population std {std}, expected 0 and 1"
    for no_spread in [torch.tensor([4.2]), torch.full((8,), 3.0)]:
        result = fn(no_spread)
        if not torch.isfinite(result).all() or result.abs().max() > 1e-6:
            return f"{no_spread.tolist()} (no spread) gave {result.tolist()}, expected zeros"
    return None


def normalize_unbiased(reward, eps=1e-5):
    """The seed's version: `std()` has correction 1, NaN for a batch of one."""
    return (reward - reward.mean()) / (reward.std() + eps)


def normalize_no_eps(reward, eps=1e-5):
    """Population std but no eps: 0 / 0 = NaN for constant rewards."""
    return (reward - reward.mean()) / reward.std(correction=0)


def normalize_centre_only(reward, eps=1e-5):
    return reward - reward.mean()


def test_normalize_reward():
    problem = normalization_problem(normalize_reward)
    assert problem is None, problem


@pytest.mark.filterwarnings("ignore:std")
@pytest.mark.parametrize("wrong", [normalize_unbiased, normalize_no_eps, normalize_centre_only])
def test_normalize_check_rejects_wrong_versions(wrong):
    assert normalization_problem(wrong) is not None


# ---------------------------------------------------------------- get_rewards


def three_periods(samples: list[str]) -> list[float]:
    return [3.0] * len(samples)


def too_few_rewards(samples: list[str]) -> list[float]:
    return [1.0] * (len(samples) - 1)


def nan_for_the_second(samples: list[str]) -> torch.Tensor:
    rewards = torch.ones(len(samples))
    rewards[1] = float("nan")
    return rewards


def raises_key_error(samples: list[str]) -> list[float]:
    return [{"positive": 1.0}["negative"] for _ in samples]


def test_get_rewards_returns_a_float_tensor():
    rewards = get_rewards(three_periods, SAMPLES)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [3.0, 3.0, 3.0]
    assert get_rewards(reward_fn_char_count, SAMPLES).tolist() == [2.0, 0.0, 3.0]
    # A (batch, 1) tensor, as classifiers often return, is flattened to one reward per sample.
    column = get_rewards(lambda s: torch.arange(len(s), dtype=torch.float64)[:, None], SAMPLES)
    assert column.tolist() == [0.0, 1.0, 2.0] and column.dtype == torch.float32


def bad_reward_fn_problem(get_rewards_fn: Callable) -> str | None:
    """None if each bad reward function raises an error naming it and quoting the offending
    sample, else what was raised instead."""
    cases = [
        (too_few_rewards, SAMPLES[0], "one number per sample"),
        (nan_for_the_second, SAMPLES[1], "nan"),
        (raises_key_error, SAMPLES[0], "KeyError"),
    ]
    for reward_fn, sample, detail in cases:
        try:
            get_rewards_fn(reward_fn, SAMPLES)
        except RuntimeError as error:
            message = str(error)
            if reward_fn.__name__ not in message or repr(sample) not in message:
                return f"{reward_fn.__name__}: {message!r} does not name it and quote {sample!r}"
            if detail not in message:
                return f"{reward_fn.__name__}: {message!r} does not say {detail!r}"
        except Exception as error:  # the raw error from inside, naming neither function nor sample
            return f"{reward_fn.__name__}: raised {error!r}, not a RuntimeError that explains it"
        else:
            return f"{reward_fn.__name__}: nothing raised"
    return None


def get_rewards_unchecked(reward_fn, samples, device="cpu"):
    """Trusts the reward function: no length or NaN check, its errors pass through unexplained."""
    return torch.as_tensor(reward_fn(samples), dtype=torch.float32).to(device)


def get_rewards_length_only(reward_fn, samples, device="cpu"):
    rewards = torch.as_tensor(reward_fn(samples), dtype=torch.float32)
    if len(rewards) != len(samples):
        raise RuntimeError(f"{reward_fn.__name__}: one number per sample; got {samples[0]!r}")
    return rewards


def test_get_rewards_errors_name_the_function_and_a_sample():
    problem = bad_reward_fn_problem(get_rewards)
    assert problem is None, problem


@pytest.mark.parametrize("wrong", [get_rewards_unchecked, get_rewards_length_only])
def test_reward_check_rejects_wrong_versions(wrong):
    assert bad_reward_fn_problem(wrong) is not None


def test_get_rewards_rejects_infinity():
    with pytest.raises(RuntimeError, match="inf"):
        get_rewards(lambda samples: [float("inf")] * len(samples), SAMPLES)
