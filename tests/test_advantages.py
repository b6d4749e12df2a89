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

from minirlhf.advantages import compute_advantages, compute_gae

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
    assert torch.equal(compute_advantages(values, torch.tensor([10.0]), 2), expected)


def test_compute_advantages_matches_oracle():
    problem = one_step_mismatch(compute_advantages)
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
    assert torch.allclose(gae, compute_advantages(values, rewards, PREFIX_LEN), atol=1e-6)
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
    assert not compute_advantages(values, rewards, PREFIX_LEN).requires_grad
    assert not compute_gae(values, rewards, PREFIX_LEN).requires_grad


def test_jaxtyping_checker_catches_a_shape_mistake():
    """Tests run with jaxtyping's runtime checker: 1-D values (a forgotten batch axis) fail loudly.

    Without the checker the same call fails deep inside the slicing with an IndexError that names
    no argument; with it, the error names the argument and the expected shape.
    """
    values, rewards = make_inputs(0)
    with pytest.raises(TypeCheckError, match="values"):
        compute_advantages(values[0], rewards, PREFIX_LEN)
    with pytest.raises(IndexError):  # the unchecked wrong version: no mention of `values`
        seed_one_step(values[0], rewards, PREFIX_LEN)
