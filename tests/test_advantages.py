"""Tests for minirlhf.advantages against naive per-position loops over python floats.

Positions: generated token t sits at `prefix_len + t` and was chosen in state s_t, whose value is
`values[b, prefix_len - 1 + t]`. The oracles below index that position explicitly, one float at a
time, so they share no slicing with the code under test. Each oracle check also rejects a
plausible wrong implementation, written out in this file.
"""

from collections.abc import Callable

import pytest
import torch
from jaxtyping import TypeCheckError

from minirlhf.advantages import (
    ESTIMATORS,
    compute_advantages,
    compute_gae,
    compute_one_step_advantages,
    whiten,
)
from minirlhf.exercises import MISTAKES

BATCH, SEQ, PREFIX_LEN = 3, 9, 4
GEN_LEN = SEQ - PREFIX_LEN


def make_inputs(seed: int = 0, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, SEQ, generator=generator)
    rewards = torch.randn(batch, generator=generator) * 3
    return values, rewards


# ---------------------------------------------------------------- oracles (python floats)


def one_step_oracle(values: torch.Tensor, rewards: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """A_t = V(s_{t+1}) - V(s_t), with the reward as the target of the last step."""
    batch, seq = values.shape
    gen_len = seq - prefix_len
    rows = []
    for b in range(batch):
        row = []
        for step in range(gen_len):
            pos = prefix_len - 1 + step  # the position whose value is V(s_step)
            target = rewards[b].item() if step == gen_len - 1 else values[b, pos + 1].item()
            row.append(target - values[b, pos].item())
        rows.append(row)
    return torch.tensor(rows)


def gae_oracle(
    values: torch.Tensor, rewards: torch.Tensor, prefix_len: int, gamma: float, gae_lambda: float
) -> torch.Tensor:
    """GAE by the textbook backwards recursion; the episode ends after the last token (V = 0)."""
    batch, seq = values.shape
    gen_len = seq - prefix_len
    rows = []
    for b in range(batch):
        row = [0.0] * gen_len
        running = 0.0
        for step in reversed(range(gen_len)):
            value = values[b, prefix_len - 1 + step].item()
            last = step == gen_len - 1
            next_value = 0.0 if last else values[b, prefix_len + step].item()
            reward = rewards[b].item() if last else 0.0
            delta = reward + gamma * next_value - value
            running = delta + gamma * gae_lambda * running
            row[step] = running
        rows.append(row)
    return torch.tensor(rows)


def mismatch(result: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when `result` has the shape and (to 1e-5) the values of `expected`, else both."""
    if result.shape == expected.shape and torch.allclose(result, expected, atol=1e-5):
        return None
    return f"got {result}, expected {expected}"


def one_step_mismatch(fn: Callable) -> str | None:
    """None if fn(values, rewards, prefix_len) equals the one-step oracle on a few inputs, else
    the first difference."""
    for seed, prefix_len in [(0, PREFIX_LEN), (1, 1), (2, SEQ - 1)]:
        values, rewards = make_inputs(seed)
        try:
            result = fn(values, rewards, prefix_len)
        except RuntimeError as error:  # a shape bug that broadcasting could not paper over
            return f"prefix_len={prefix_len}: raised {error}"
        problem = mismatch(result, one_step_oracle(values, rewards, prefix_len))
        if problem is not None:
            return f"prefix_len={prefix_len}: {problem}"
    return None


GAE_SETTINGS = [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0), (0.5, 0.5)]


def gae_mismatch(fn: Callable) -> str | None:
    """None if fn(values, rewards, prefix_len, gamma, gae_lambda) equals the GAE oracle, else the
    first difference."""
    for seed, (gamma, gae_lambda) in enumerate(GAE_SETTINGS):
        values, rewards = make_inputs(seed)
        result = fn(values, rewards, PREFIX_LEN, gamma, gae_lambda)
        problem = mismatch(result, gae_oracle(values, rewards, PREFIX_LEN, gamma, gae_lambda))
        if problem is not None:
            return f"gamma={gamma}, gae_lambda={gae_lambda}: {problem}"
    return None


# ---------------------------------------------------------------- wrong implementations


def seed_one_step(values, rewards, prefix_len):
    """The seed's bug: `values[prefix_len-1:-1]` slices the batch axis, not the positions."""
    one_step_estimate = torch.cat([values[:, prefix_len:-1], rewards[:, None]], dim=-1)
    return one_step_estimate - values[prefix_len - 1 : -1]


def one_step_shifted_state(values, rewards, prefix_len):
    """Off by one: V(s_t) read one position late, at the generated token itself."""
    one_step_estimate = torch.cat([values[:, prefix_len + 1 :], rewards[:, None]], dim=-1)
    return one_step_estimate - values[:, prefix_len:]


def one_step_no_reward(values, rewards, prefix_len):
    """Bootstraps the last step from the value of the final position instead of the reward."""
    return values[:, prefix_len:] - values[:, prefix_len - 1 : -1]


def gae_bootstraps_last_value(values, rewards, prefix_len, gamma, gae_lambda):
    """Forgets that the episode ends: V of the full sequence is used after the last token."""
    state_values = values[:, prefix_len - 1 : -1]
    next_values = values[:, prefix_len:]
    deltas = -state_values + gamma * next_values
    deltas[:, -1] += rewards
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(rewards)
    for step in reversed(range(deltas.shape[1])):
        running = deltas[:, step] + gamma * gae_lambda * running
        advantages[:, step] = running
    return advantages


def gae_lambda_without_gamma(values, rewards, prefix_len, gamma, gae_lambda):
    """Decays the running sum by lambda alone instead of gamma * lambda."""
    return compute_gae(values, rewards, prefix_len, gamma=1.0, gae_lambda=gae_lambda * gamma)


def gae_shifted_state(values, rewards, prefix_len, gamma, gae_lambda):
    """Off by one: V(s_t) read at the generated token's own position."""
    padded = torch.cat([values, values[:, -1:]], dim=1)
    return compute_gae(padded, rewards, prefix_len + 1, gamma, gae_lambda)


# ---------------------------------------------------------------- tests


def test_one_step_oracle_by_hand():
    """The oracle itself on numbers worked by hand: prefix_len 2, gen_len 3."""
    values = torch.tensor([[9.0, 1.0, 2.0, 4.0, 8.0]])  # V(s_0..s_2) = 1, 2, 4; 8 is never used
    expected = torch.tensor([[2.0 - 1.0, 4.0 - 2.0, 10.0 - 4.0]])
    assert torch.equal(one_step_oracle(values, torch.tensor([10.0]), 2), expected)
    assert torch.equal(compute_one_step_advantages(values, torch.tensor([10.0]), 2), expected)


def test_compute_one_step_advantages_matches_oracle():
    problem = one_step_mismatch(compute_one_step_advantages)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong", [seed_one_step, one_step_shifted_state, one_step_no_reward]
)
def test_one_step_check_rejects_wrong_versions(wrong):
    assert one_step_mismatch(wrong) is not None


def test_gae_oracle_by_hand():
    """gamma 0.5, lambda 0.5, V(s_0) = 1, V(s_1) = 2, reward 4, prefix_len 1.

    delta_1 = 4 + 0 - 2 = 2, A_1 = 2; delta_0 = 0 + 0.5 * 2 - 1 = 0, A_0 = 0 + 0.25 * 2 = 0.5.
    """
    values, rewards = torch.tensor([[1.0, 2.0, 7.0]]), torch.tensor([4.0])
    expected = torch.tensor([[0.5, 2.0]])
    assert torch.allclose(gae_oracle(values, rewards, 1, 0.5, 0.5), expected)
    assert torch.allclose(compute_gae(values, rewards, 1, 0.5, 0.5), expected)


def test_compute_gae_matches_oracle():
    problem = gae_mismatch(compute_gae)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong", [gae_bootstraps_last_value, gae_lambda_without_gamma, gae_shifted_state]
)
def test_gae_check_rejects_wrong_versions(wrong):
    assert gae_mismatch(wrong) is not None


def test_gae_with_lambda_0_is_the_one_step_estimate():
    values, rewards = make_inputs(5)
    gae = compute_gae(values, rewards, PREFIX_LEN, gamma=1.0, gae_lambda=0.0)
    assert torch.allclose(gae, compute_one_step_advantages(values, rewards, PREFIX_LEN), atol=1e-6)
    assert torch.allclose(gae, one_step_oracle(values, rewards, PREFIX_LEN), atol=1e-5)


def monte_carlo_oracle(values, rewards, prefix_len):
    """lambda = gamma = 1: every token's advantage is the final reward minus V(s_t)."""
    gen_len = values.shape[1] - prefix_len
    return torch.tensor(
        [
            [rewards[b].item() - values[b, prefix_len - 1 + step].item() for step in range(gen_len)]
            for b in range(values.shape[0])
        ]
    )


def test_gae_with_lambda_1_is_monte_carlo():
    values, rewards = make_inputs(6)
    gae = compute_gae(values, rewards, PREFIX_LEN, gamma=1.0, gae_lambda=1.0)
    problem = mismatch(gae, monte_carlo_oracle(values, rewards, PREFIX_LEN))
    assert problem is None, problem
    # The same comparison rejects an estimator that is not Monte Carlo (lambda 0.95).
    not_mc = compute_gae(values, rewards, PREFIX_LEN, gamma=1.0, gae_lambda=0.95)
    assert mismatch(not_mc, monte_carlo_oracle(values, rewards, PREFIX_LEN)) is not None


def test_advantages_are_not_differentiable():
    """Advantages are targets: no gradient may flow into the value head through them."""
    values = torch.randn(2, SEQ, requires_grad=True)
    rewards = torch.randn(2)
    assert not compute_one_step_advantages(values, rewards, PREFIX_LEN).requires_grad
    assert not compute_gae(values, rewards, PREFIX_LEN).requires_grad


def test_jaxtyping_checker_catches_a_shape_mistake():
    """Tests run with jaxtyping's runtime checker: 1-D values (a forgotten batch axis) fail loudly.

    Without the checker the same call fails deep inside the slicing with an IndexError that names
    no argument; with it, the error names the argument and the expected shape.
    """
    values, rewards = make_inputs(0)
    with pytest.raises(TypeCheckError, match="values"):
        compute_one_step_advantages(values[0], rewards, PREFIX_LEN)
    with pytest.raises(IndexError):  # the unchecked wrong version: no mention of `values`
        seed_one_step(values[0], rewards, PREFIX_LEN)


# ---------------------------------------------------------------- the dispatcher


def dispatched_mismatch(dispatch: Callable) -> str | None:
    """None if dispatch(estimator, rewards, values, kl, kl_coef, group_size, gamma, gae_lambda),
    given V(s_t) at the generated states only (`values[:, prefix_len - 1 : -1]`, as the
    rollout hands them over), equals the one-step and GAE oracles on the full values."""
    for seed, (gamma, gae_lambda) in enumerate(GAE_SETTINGS):
        values, rewards = make_inputs(seed)
        state_values, kl = values[:, PREFIX_LEN - 1 : -1], torch.zeros(BATCH, GEN_LEN)
        for estimator, expected in [
            ("one_step", one_step_oracle(values, rewards, PREFIX_LEN)),
            ("gae", gae_oracle(values, rewards, PREFIX_LEN, gamma, gae_lambda)),
        ]:
            try:
                result = dispatch(estimator, rewards, state_values, kl, 0.1, 1, gamma, gae_lambda)
            except (RuntimeError, IndexError) as error:
                return f"{estimator}: raised {error}"
            if (problem := mismatch(result, expected)) is not None:
                return f"{estimator}, gamma={gamma}, gae_lambda={gae_lambda}: {problem}"
    return None


def dispatch_reading_state_values_as_a_sequence(estimator, rewards, values, kl, kl_coef,
                                                group_size, gamma, gae_lambda):
    """Hands the generated states' values on as if they were every position's, with the
    prompt's length 1: the first state is read as the prompt's, every target one step late."""
    if estimator == "one_step":
        return compute_one_step_advantages(values, rewards, 1)
    return compute_gae(values, rewards, 1, gamma, gae_lambda)


def dispatch_ignoring_gamma_and_lambda(estimator, rewards, values, kl, kl_coef, group_size,
                                       gamma, gae_lambda):
    """Drops the discount arguments on the way (GAE with its defaults)."""
    return compute_advantages(estimator, rewards, values, kl, kl_coef, group_size)


def test_the_dispatcher_matches_the_oracles():
    problem = dispatched_mismatch(compute_advantages)
    assert problem is None, problem


@pytest.mark.parametrize(
    "wrong", [dispatch_reading_state_values_as_a_sequence, dispatch_ignoring_gamma_and_lambda]
)
def test_the_dispatcher_check_rejects_wrong_versions(wrong):
    assert dispatched_mismatch(wrong) is not None


def test_only_the_critics_estimators_need_a_value_head_and_whitening():
    """PPO's one-step and GAE read a value head and are whitened per minibatch (CleanRL); the
    critic-free estimators come scaled as their papers say."""
    assert {name for name, e in ESTIMATORS.items() if e.needs_critic} == {"one_step", "gae"}
    assert {name for name, e in ESTIMATORS.items() if e.whitened} == {"one_step", "gae"}
    assert set(ESTIMATORS) == {"one_step", "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                               "reinforce_pp_baseline"}


# ---------------------------------------------------------------- whitening


def whiten_oracle(advantages: torch.Tensor, mean: float | None = None,
                  std: float | None = None) -> torch.Tensor:
    """(a - mean) / (std + 1e-8) over every token of the minibatch, one float at a time, with the
    population std (n, not n - 1); the mean and std given, or the minibatch's own."""
    values = advantages.flatten().tolist()
    if mean is None:
        mean = sum(values) / len(values)
        std = (sum((a - mean) ** 2 for a in values) / len(values)) ** 0.5
    return torch.tensor([(a - mean) / (std + 1e-8) for a in values]).reshape(advantages.shape)


def whiten_mismatch(fn: Callable) -> str | None:
    """None if fn(advantages) equals the oracle on a spread minibatch, rows with different
    means, one token and equal advantages (the last two: 0, not NaN), else the first
    difference."""
    generator = torch.Generator().manual_seed(0)
    cases = {"spread": torch.randn(4, 5, generator=generator) * 3 + 1,
             "rows apart": torch.randn(3, 4, generator=generator) + torch.arange(3.0)[:, None] * 5,
             "one token": torch.tensor([[2.5]]), "equal": torch.full((2, 3), 1.5)}
    for name, advantages in cases.items():
        result = fn(advantages)
        if not torch.isfinite(result).all():
            return f"{name}: {result.tolist()} is not finite"
        if (problem := mismatch(result, whiten_oracle(advantages))) is not None:
            return f"{name}: {problem}"
    return None


def test_whiten_matches_oracle():
    problem = whiten_mismatch(whiten)
    assert problem is None, problem


@pytest.mark.filterwarnings("ignore:std")
@pytest.mark.parametrize("wrong", [pytest.param(m.imitate, id=m.hint[:40])
                                   for m in MISTAKES["whiten"]])
def test_whiten_check_rejects_wrong_versions(wrong):
    """The exercises' catalogue of whitening mistakes (the sample std's NaN on one token among
    them)."""
    assert whiten_mismatch(wrong) is not None


def test_whiten_with_given_moments_uses_them_not_the_minibatchs_own():
    """Data parallelism whitens each process's share with the global minibatch's moments."""
    advantages = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    moments = (torch.tensor(0.5), torch.tensor(2.0))
    expected = whiten_oracle(advantages, 0.5, 2.0)
    assert mismatch(whiten(advantages, moments), expected) is None
    assert mismatch(whiten(advantages), expected) is not None  # its own moments differ
