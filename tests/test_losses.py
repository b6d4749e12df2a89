"""Tests for minirlhf.losses against independent oracles.

Oracles: `torch.gather` for log-probs, `torch.distributions` for the KL and the entropy, and
numbers worked by hand or naive loops for the value loss and the clipped surrogate. Every check
is a `*_difference(fn)` helper that returns what differed (None when nothing did): it must find
nothing in the library and something in every wrong implementation of the exercises' catalogue
(`minirlhf.exercises.MISTAKES`, the one copy of them), so none of them can pass vacuously.
"""

import math
from collections.abc import Callable

import pytest
import torch
from jaxtyping import TypeCheckError
from torch.distributions import Categorical, kl_divergence

from minirlhf.exercises import MISTAKES
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    get_logprobs,
)


def catalogue(exercise: str) -> list:
    """The catalogue's wrong implementations of one exercise whose values are wrong, as pytest
    parameters (those whose values are right and gradients wrong are tested by gradient)."""
    return [pytest.param(m.imitate, id=m.hint[:40]) for m in MISTAKES[exercise]
            if not m.gradient_only]


def random_logits(seed: int, shape=(3, 5, 11), scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- get_logprobs


def gather_oracle(logits: torch.Tensor, tokens: torch.Tensor, prefix_len: int | None):
    """log softmax(logits[:, s])[tokens[:, s + 1]] by torch.gather, for s from prefix_len - 1."""
    start = 0 if prefix_len is None else prefix_len - 1
    logprobs = torch.log_softmax(logits[:, start:-1], dim=-1)
    next_tokens = tokens[:, start + 1 :]
    return torch.gather(logprobs, dim=-1, index=next_tokens[..., None]).squeeze(-1)


def differ(expected: torch.Tensor, result, where: str, **tolerance) -> str | None:
    """What differs between a result and the oracle's (shape, then values), or None."""
    if not isinstance(result, torch.Tensor) or result.shape != expected.shape:
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        return f"{where}: shape {shape}, expected {tuple(expected.shape)}"
    if not torch.allclose(result, expected, **tolerance):
        return f"{where}: {result.tolist()} != expected {expected.tolist()}"
    return None


def logprobs_difference(fn: Callable) -> str | None:
    batch, seq, d_vocab = 3, 8, 13
    logits = random_logits(0, (batch, seq, d_vocab))
    tokens = torch.randint(0, d_vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    for prefix_len in [None, 1, 3, seq - 1]:
        expected = gather_oracle(logits, tokens, prefix_len)
        problem = differ(expected, fn(logits, tokens, prefix_len), f"prefix_len={prefix_len}",
                         atol=1e-6)
        if problem:
            return problem
    return None


def test_get_logprobs_by_hand():
    """Two tokens, uniform then certain: log(1/2) for the first, ~0 for the second."""
    logits = torch.tensor([[[0.0, 0.0], [-100.0, 100.0], [5.0, 5.0]]])
    tokens = torch.tensor([[0, 1, 1]])
    result = get_logprobs(logits, tokens, prefix_len=1)
    assert torch.allclose(result, torch.tensor([[math.log(0.5), 0.0]]), atol=1e-6)


def test_get_logprobs_matches_gather_oracle():
    assert (problem := logprobs_difference(get_logprobs)) is None, problem


@pytest.mark.parametrize("wrong", catalogue("get_logprobs"))
def test_logprobs_check_rejects_wrong_versions(wrong):
    assert logprobs_difference(wrong) is not None


# ---------------------------------------------------------------- KL penalty


def kl_oracle(logits: torch.Tensor, ref_logits: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """kl_coef * mean over positions of KL(policy || reference), from torch.distributions."""
    kl = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits))
    return kl_coef * kl.mean()


def kl_difference(fn: Callable) -> str | None:
    for seed, kl_coef in [(0, 1.0), (1, 0.3), (2, 2.5)]:
        logits, ref_logits = random_logits(seed), random_logits(seed + 100)
        problem = differ(kl_oracle(logits, ref_logits, kl_coef), fn(logits, ref_logits, kl_coef),
                         f"seed {seed}, kl_coef {kl_coef}", rtol=1e-5, atol=1e-6)
        if problem:
            return problem
    return None


def test_kl_penalty_matches_torch_distributions():
    assert (problem := kl_difference(calc_kl_penalty)) is None, problem


@pytest.mark.parametrize("wrong", catalogue("calc_kl_penalty"))
def test_kl_checks_reject_wrong_versions(wrong):
    """Every catalogued mistake fails the oracle or, for the unsafe ones, the safety check."""
    assert kl_difference(wrong) is not None or kl_safety_problem(wrong) is not None


def test_kl_penalty_by_hand():
    """Policy (1/2, 1/2), reference (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3)."""
    logits = torch.log(torch.tensor([[[0.5, 0.5]]]))
    ref_logits = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.2 * 0.5 * math.log(4 / 3)
    assert calc_kl_penalty(logits, ref_logits, kl_coef=0.2).item() == pytest.approx(expected)


def kl_safety_problem(fn: Callable) -> str | None:
    """Never negative or non-finite: identical logits give 0, huge opposite logits the exact KL.

    Policy logits (1e4, -1e4) put all mass on token 0, to which the reference (-1e4, 1e4) gives
    log-prob -2e4, so KL = 2e4 (to float precision). Probabilities underflow to 0 here; only a
    log-softmax computation survives it.
    """
    same = random_logits(3, scale=30.0)
    identical = fn(same, same.clone(), 1.0)
    if not torch.isfinite(identical) or identical.item() < 0 or identical.item() > 1e-6:
        return f"identical logits give {identical.item()}, not 0"
    huge = torch.tensor([[[1e4, -1e4]]])
    result = fn(huge, -huge, 0.5)
    if not torch.isfinite(result) or result.item() != pytest.approx(0.5 * 2e4, rel=1e-4):
        return f"huge opposite logits give {result.item()}, not 0.5 * 2e4"
    # Many random pairs, some close to each other (where rounding could make a KL negative).
    for seed in range(5):
        logits = random_logits(seed, scale=10.0)
        near = fn(logits, logits + 1e-4 * random_logits(seed + 50), 1.0)
        if near.item() < 0 or near.isnan():
            return f"nearby logits (seed {seed}) give {near.item()}"
    return None


def test_kl_penalty_is_never_negative_or_nan():
    assert (problem := kl_safety_problem(calc_kl_penalty)) is None, problem


def test_kl_safety_check_rejects_log_of_probabilities():
    """log(softmax(x)) passes the oracle on moderate logits; only the safety check catches it."""
    def log_of_softmax(logits, ref_logits, kl_coef):
        probs, ref_probs = logits.softmax(-1), ref_logits.softmax(-1)
        return kl_coef * (probs * (probs.log() - ref_probs.log())).sum(-1).mean()

    assert kl_difference(log_of_softmax) is None
    assert kl_safety_problem(log_of_softmax) is not None


def test_kl_penalty_is_differentiable_and_scales_with_coef():
    logits = random_logits(7).requires_grad_()
    ref_logits = random_logits(8)
    penalty = calc_kl_penalty(logits, ref_logits, kl_coef=1.0)
    penalty.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert calc_kl_penalty(logits, ref_logits, kl_coef=0.0).item() == 0.0
    assert calc_kl_penalty(logits, ref_logits, kl_coef=3.0).item() == pytest.approx(
        3 * penalty.item(), rel=1e-5
    )


# ---------------------------------------------------------------- entropy bonus


def entropy_difference(fn: Callable) -> str | None:
    for seed, ent_coef in [(0, 1.0), (1, 0.01), (2, 0.5)]:
        logits = random_logits(seed)
        expected = ent_coef * Categorical(logits=logits).entropy().mean()
        problem = differ(expected, fn(logits, ent_coef), f"seed {seed}, ent_coef {ent_coef}",
                         rtol=1e-5, atol=1e-7)
        if problem:
            return problem
    return None


def test_entropy_bonus_matches_torch_distributions():
    assert (problem := entropy_difference(calc_entropy_bonus)) is None, problem


@pytest.mark.parametrize("wrong", catalogue("calc_entropy_bonus"))
def test_entropy_check_rejects_wrong_versions(wrong):
    assert entropy_difference(wrong) is not None


def test_entropy_by_hand():
    """Uniform over 4 tokens: entropy log 4; a certain token (huge logit): 0, not NaN."""
    uniform = torch.zeros(1, 1, 4)
    assert calc_entropy_bonus(uniform, 1.0).item() == pytest.approx(math.log(4))
    certain = torch.tensor([[[1e4, 0.0, 0.0]]])
    assert calc_entropy_bonus(certain, 1.0).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- value function loss


def value_loss_difference(fn: Callable) -> str | None:
    """Worked by hand: errors 1, 2, 3, 4, mean square 30 / 4 = 7.5, halved 3.75, times vf_coef."""
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    returns = torch.zeros(2, 2)
    for vf_coef in [1.0, 0.5, 0.15]:
        if (got := fn(values, returns, vf_coef).item()) != pytest.approx(3.75 * vf_coef):
            return f"by hand, vf_coef {vf_coef}: {got} != {3.75 * vf_coef}"
    # And a naive loop on random numbers.
    generator = torch.Generator().manual_seed(0)
    values, returns = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    squares = [
        (values[b, s].item() - returns[b, s].item()) ** 2 for b in range(3) for s in range(4)
    ]
    expected = 0.5 * 0.3 * sum(squares) / len(squares)
    if (got := fn(values, returns, 0.3).item()) != pytest.approx(expected):
        return f"naive loop: {got} != {expected}"
    return None


def test_value_function_loss_matches_oracle():
    assert (problem := value_loss_difference(calc_value_function_loss)) is None, problem


@pytest.mark.parametrize("wrong", catalogue("calc_value_function_loss"))
def test_value_loss_check_rejects_wrong_versions(wrong):
    assert value_loss_difference(wrong) is not None


def test_jaxtyping_checker_catches_broadcasting_returns():
    """returns of shape (batch, 1) broadcast silently to a wrong loss; the checker refuses them."""
    values, returns = torch.randn(4, 3), torch.randn(4, 1)
    unchecked = MISTAKES["calc_value_function_loss"][0].imitate  # any function without jaxtyping
    assert torch.isfinite(unchecked(values, returns, 1.0))  # a silent, wrong number
    with pytest.raises(TypeCheckError):
        calc_value_function_loss(values, returns, 1.0)


# ---------------------------------------------------------------- clipped surrogate objective


def surrogate_oracle(logprobs, mb_logprobs, mb_advantages, clip_coef) -> float:
    """A naive loop: min(r A, clip(r) A), mean. The advantages are used as given (the learning
    loop whitens them first where the estimator asks for it: test_advantages.py tests `whiten`,
    test_trainer.py that the loop calls it)."""
    pairs = zip(logprobs.flatten().tolist(), mb_logprobs.flatten().tolist(), strict=True)
    ratios = [math.exp(new - old) for new, old in pairs]
    advantages = mb_advantages.flatten().tolist()
    terms = []
    for r, a in zip(ratios, advantages, strict=True):
        clipped_r = min(max(r, 1 - clip_coef), 1 + clip_coef)
        terms.append(min(r * a, clipped_r * a))
    return sum(terms) / len(terms)


def surrogate_difference(fn: Callable) -> str | None:
    # By hand: advantages (1, -1), ratios 1.5 and 0.5, clip 0.2:
    # min(1.5, 1.2) = 1.2 and min(-0.5, -0.8) = -0.8, mean 0.2.
    logprobs = torch.log(torch.tensor([[1.5, 0.5]]))
    by_hand = fn(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), 0.2)
    if by_hand.item() != pytest.approx(0.2, abs=1e-6):
        return f"by hand: {by_hand.item()} != 0.2"
    generator = torch.Generator().manual_seed(0)
    for clip_coef in [0.1, 0.2, 0.3]:
        mb_logprobs = -torch.rand(4, 6, generator=generator) * 3
        logprobs = mb_logprobs + torch.randn(4, 6, generator=generator) * 0.3
        advantages = torch.randn(4, 6, generator=generator) * 2 + 1
        expected = surrogate_oracle(logprobs, mb_logprobs, advantages, clip_coef)
        got = fn(logprobs, mb_logprobs, advantages, clip_coef).item()
        if got != pytest.approx(expected, abs=1e-5):
            return f"clip_coef {clip_coef}: {got} != naive loop's {expected}"
    return None


def test_clipped_surrogate_matches_oracle():
    assert (problem := surrogate_difference(calc_clipped_surrogate_objective)) is None, problem


@pytest.mark.parametrize("wrong", catalogue("calc_clipped_surrogate_objective"))
def test_surrogate_checks_reject_wrong_versions(wrong):
    """Every catalogued mistake (whitening the advantages again among them) fails the oracle."""
    assert surrogate_difference(wrong) is not None


def test_surrogate_uses_the_advantages_as_given():
    """One token, or equal advantages: nothing is normalised away. Ratio 1 gives the advantage
    itself (3.0, 0.7); a surrogate that still whitened would give 0."""
    one = calc_clipped_surrogate_objective(torch.zeros(1, 1), torch.zeros(1, 1),
                                           torch.tensor([[3.0]]), 0.2)
    equal = calc_clipped_surrogate_objective(torch.zeros(2, 3), torch.zeros(2, 3),
                                             torch.full((2, 3), 0.7), 0.2)
    assert one.item() == pytest.approx(3.0) and equal.item() == pytest.approx(0.7)
    whitens = next(m.imitate for m in MISTAKES["calc_clipped_surrogate_objective"]
                   if "whitened" in m.hint)
    assert whitens(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([[3.0]]), 0.2).item() == 0.0


def test_surrogate_gradient_is_zero_once_clipped():
    """Past the clip (ratio 1.5 > 1.2, positive advantage) the gradient vanishes; inside, not."""
    advantages = torch.tensor([[1.0, -1.0]])
    logprobs = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_()
    calc_clipped_surrogate_objective(logprobs, torch.zeros(1, 2), advantages, 0.2).backward()
    assert logprobs.grad[0, 0].item() == 0.0
    assert logprobs.grad[0, 1].item() == pytest.approx(-0.5)  # d/dlogp (r * -1) / 2 at r = 1


# ---------------------------------------------------------------- masked (-inf) logits


def masked_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference logits where some tokens are masked (-inf), as top-k masking or a
    banned token gives; the reference masks a subset of the policy's masked tokens."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 7, generator=generator)
    ref_logits = torch.randn(2, 3, 7, generator=generator)
    logits[..., :2] = float("-inf")
    ref_logits[..., :1] = float("-inf")
    return logits, ref_logits


def masked_logits_problem(kl_fn: Callable, entropy_fn: Callable) -> str | None:
    """KL and entropy with masked tokens against torch.distributions, and finite gradients."""
    logits, ref_logits = masked_logits()
    logits.requires_grad_(True)
    kl, entropy = kl_fn(logits, ref_logits, 1.0), entropy_fn(logits, 1.0)
    expected_kl = kl_divergence(Categorical(logits=logits.detach()),
                                Categorical(logits=ref_logits)).mean()
    expected_entropy = Categorical(logits=logits.detach()).entropy().mean()
    if not torch.allclose(kl, expected_kl, atol=1e-5):
        return f"KL {kl.item()} with masked tokens, expected {expected_kl.item()}"
    if not torch.allclose(entropy, expected_entropy, atol=1e-5):
        return f"entropy {entropy.item()} with masked tokens, expected {expected_entropy.item()}"
    (kl + entropy).backward()
    if not torch.isfinite(logits.grad).all():
        return "the gradient with masked tokens is not finite"
    return None


def test_masked_tokens_add_nothing_and_keep_gradients_finite():
    problem = masked_logits_problem(calc_kl_penalty, calc_entropy_bonus)
    assert problem is None, problem


def kl_zeroing_terms_after_the_product(logits, ref_logits, kl_coef):
    """Zeroes masked tokens' terms after multiplying: right value, NaN gradient."""
    logprobs, ref_logprobs = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    probs = logprobs.exp()
    terms = torch.where(probs > 0, probs * (logprobs - ref_logprobs), 0.0)
    return kl_coef * terms.sum(-1).mean()


def entropy_without_masking(logits, ent_coef):
    logprobs = logits.log_softmax(-1)
    return ent_coef * -(logprobs.exp() * logprobs).sum(-1).mean()


@pytest.mark.parametrize("kl_fn, entropy_fn", [
    (kl_zeroing_terms_after_the_product, calc_entropy_bonus),
    (calc_kl_penalty, entropy_without_masking),
])
def test_the_masked_check_sees_nan_values_or_gradients(kl_fn, entropy_fn):
    assert masked_logits_problem(kl_fn, entropy_fn) is not None
