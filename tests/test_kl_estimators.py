"""Tests for the sampled KL estimators k1, k2, k3 of minirlhf.losses (Schulman 2020).

Oracle: two hand-picked categorical distributions p (the policy) and q (the reference), whose
exact KL(p || q) torch.distributions computes. Tokens are drawn from p; the Monte-Carlo mean of
each estimator must lie within 5 standard errors of its expectation (the KL for k1 and k3,
E_p[(log q/p)^2] / 2 for k2). The same check rejects each estimator with its ratio inverted
(p/q instead of q/p), the classic mistake, for k1 and k3; k2 is symmetric in log r, so its
check is shown failing on a lost factor 1/2.
"""

from collections.abc import Callable

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from minirlhf.losses import (
    KL_ESTIMATORS,
    calc_exact_kl,
    calc_kl_k1,
    calc_kl_k2,
    calc_kl_k3,
    calc_kl_penalty,
)

P_PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
Q_PROBS = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2])
DRAWS = 200_000


def sampled_logprobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) and log q(x) for DRAWS tokens x ~ p, shaped (batch 1000, gen_len 200)."""
    p, q = Categorical(probs=P_PROBS), Categorical(probs=Q_PROBS)
    torch.manual_seed(seed)
    tokens = p.sample((1000, DRAWS // 1000))
    return p.log_prob(tokens), q.log_prob(tokens)


def expectation_k2() -> float:
    """E_p[(log q(x) - log p(x))^2] / 2, summed over the five outcomes."""
    return (P_PROBS * 0.5 * (Q_PROBS.log() - P_PROBS.log()).pow(2)).sum().item()


def exact_kl() -> float:
    return kl_divergence(Categorical(probs=P_PROBS), Categorical(probs=Q_PROBS)).item()


def estimate_problem(fn: Callable, expected: float) -> str | None:
    """None if fn's Monte-Carlo mean is within 5 standard errors of `expected`."""
    logprobs, ref_logprobs = sampled_logprobs()
    estimates = fn(logprobs, ref_logprobs)
    mean, stderr = estimates.mean().item(), estimates.std().item() / DRAWS**0.5
    if abs(mean - expected) <= 5 * stderr:
        return None
    return f"mean {mean:.5f} +- {stderr:.5f}, expected {expected:.5f}"


def inverted(estimator: Callable) -> Callable:
    """The estimator with r = p/q instead of q/p (policy and reference swapped)."""
    return lambda logprobs, ref_logprobs: estimator(ref_logprobs, logprobs)


CASES = [(calc_kl_k1, exact_kl), (calc_kl_k2, expectation_k2), (calc_kl_k3, exact_kl)]


@pytest.mark.parametrize("estimator, expected", CASES)
def test_estimator_converges_to_its_expectation(estimator, expected):
    problem = estimate_problem(estimator, expected())
    assert problem is None, problem


@pytest.mark.parametrize("estimator", [calc_kl_k1, calc_kl_k3])
def test_the_check_rejects_an_inverted_ratio(estimator):
    assert estimate_problem(inverted(estimator), exact_kl()) is not None


def test_the_k2_check_rejects_a_missing_half():
    """k2 is symmetric in log r, so an inverted ratio cannot go wrong; a lost 1/2 can."""
    assert estimate_problem(inverted(calc_kl_k2), expectation_k2()) is None
    assert estimate_problem(lambda lp, ref: 2 * calc_kl_k2(lp, ref), expectation_k2()) is not None


def test_k2_is_not_the_kl():
    """k2 is biased: its expectation differs from the KL by far more than the Monte-Carlo noise,
    which is why the check above compares it with its own expectation."""
    assert estimate_problem(calc_kl_k2, exact_kl()) is not None


def test_estimators_by_hand():
    """log p = log 0.5, log q = log 0.25: r = 1/2. k1 = log 2, k2 = (log 2)^2 / 2,
    k3 = 1/2 - 1 + log 2."""
    logprobs, ref_logprobs = torch.tensor([[0.5]]).log(), torch.tensor([[0.25]]).log()
    log2 = torch.tensor(2.0).log().item()
    assert calc_kl_k1(logprobs, ref_logprobs).item() == pytest.approx(log2)
    assert calc_kl_k2(logprobs, ref_logprobs).item() == pytest.approx(log2**2 / 2)
    assert calc_kl_k3(logprobs, ref_logprobs).item() == pytest.approx(-0.5 + log2)
    assert KL_ESTIMATORS == {"k1": calc_kl_k1, "k2": calc_kl_k2, "k3": calc_kl_k3}


def test_k1_can_be_negative_but_k2_and_k3_cannot():
    logprobs, ref_logprobs = sampled_logprobs()
    assert (calc_kl_k1(logprobs, ref_logprobs) < 0).any()
    assert (calc_kl_k2(logprobs, ref_logprobs) >= 0).all()
    assert (calc_kl_k3(logprobs, ref_logprobs) >= 0).all()


def test_exact_kl_per_position_averages_to_the_penalty():
    generator = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(2, 3, 5, 7, generator=generator)
    per_position = calc_exact_kl(logits, ref_logits)
    expected = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits))
    assert torch.allclose(per_position, expected, atol=1e-6)
    assert calc_kl_penalty(logits, ref_logits, 2.0).item() == pytest.approx(
        2 * per_position.mean().item())


def expected_gradient(estimator: Callable) -> torch.Tensor:
    """E_{x ~ p}[grad of the estimator at x] w.r.t. p's logits, summed exactly over the five
    outcomes (the probabilities weighting them not differentiated, as when x is sampled)."""
    logits = P_PROBS.log().clone().requires_grad_(True)
    logprobs = logits.log_softmax(-1)
    estimates = estimator(logprobs[None], Q_PROBS.log()[None])[0]
    (logprobs.exp().detach() * estimates).sum().backward()
    return logits.grad


def kl_gradient(reverse: bool) -> torch.Tensor:
    logits = P_PROBS.log().clone().requires_grad_(True)
    p, q = Categorical(logits=logits), Categorical(probs=Q_PROBS)
    (kl_divergence(q, p) if reverse else kl_divergence(p, q)).backward()
    return logits.grad


def test_as_losses_the_estimators_give_different_gradients():
    """docs/critic_free.md: k1's expected gradient is 0, k2's is the KL's, k3's the reverse KL's
    (so, e.g., k3 as a loss does not follow the KL it estimates)."""
    forward, reverse = kl_gradient(reverse=False), kl_gradient(reverse=True)
    assert torch.allclose(expected_gradient(calc_kl_k1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(expected_gradient(calc_kl_k2), forward, atol=1e-6)
    assert torch.allclose(expected_gradient(calc_kl_k3), reverse, atol=1e-6)
    assert not torch.allclose(forward, reverse, atol=1e-2)  # the two are far apart here
