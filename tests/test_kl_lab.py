"""The KL lab: which sampled KL estimators, used as a loss, have the exact KL's value and
gradient in expectation, on-policy and off-policy.

A toy categorical policy pi = softmax(theta) over 6 outcomes, a reference, and an older policy
mu that sampled (off-policy). No sampling noise: each estimator's expected value is the exact
sum over the 6 outcomes, sum_x q(x) k(x), with q the sampling distribution (pi on-policy, mu
off-policy) not differentiated, so autograd of that sum is the estimator's expected gradient
through the sample log-probs. The oracle is `torch.distributions.kl_divergence` of the two
categoricals and its autograd gradient (checked against the closed form
pi * (log(pi / ref) - KL)). The table this file pins down is docs/critic_free.md's "KL lab".

rho = pi(x) / mu(x) is the importance ratio (on-policy pi / detached pi: 1, with a gradient);
sg() is stop-gradient (.detach()). "k3 * rho" is `losses.calc_kl_k3_is`, the DeepSeek-V3.2 form
behind TRL's `use_bias_correction_kl`; "k3 * sg(rho)" is the known-wrong version: its value is
right, its gradient the reverse KL's.
"""

from collections.abc import Callable

import pytest
import torch
from rich.console import Console
from torch.distributions import Categorical, kl_divergence

from minirlhf.losses import calc_kl, calc_kl_k1, calc_kl_k2, calc_kl_k3, calc_kl_k3_is
from minirlhf.trainer import RLHFTrainer

OUTCOMES = 6
THETA = torch.randn(OUTCOMES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
REF_LOGITS = torch.randn(OUTCOMES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
OLD_LOGITS = THETA + 0.7 * torch.randn(OUTCOMES, generator=torch.Generator().manual_seed(2),
                                       dtype=torch.float64)


def ratio(logprobs, old_logprobs):
    return (logprobs - old_logprobs).exp()


ESTIMATORS: dict[str, Callable] = {
    "k1": lambda lp, ref, old: calc_kl_k1(lp, ref),
    "k2": lambda lp, ref, old: calc_kl_k2(lp, ref),
    "k3": lambda lp, ref, old: calc_kl_k3(lp, ref),
    "k1 * rho": lambda lp, ref, old: ratio(lp, old) * calc_kl_k1(lp, ref),
    "k2 * rho": lambda lp, ref, old: ratio(lp, old) * calc_kl_k2(lp, ref),
    "k2 * sg(rho)": lambda lp, ref, old: ratio(lp, old).detach() * calc_kl_k2(lp, ref),
    "k3 * rho (k3_is)": calc_kl_k3_is,
    "k3 * sg(rho)": lambda lp, ref, old: ratio(lp, old).detach() * calc_kl_k3(lp, ref),
}
"""Each estimator as a loss term: (logprobs, ref_logprobs, old_logprobs) -> one per outcome."""

# (estimator, unbiased value on-policy, gradient on-policy, value off-policy, gradient off-policy)
TABLE = [
    ("k1", True, False, False, False),
    ("k2", False, True, False, False),
    ("k3", True, False, False, False),
    ("k1 * rho", True, True, True, True),
    ("k2 * rho", False, False, False, False),
    ("k2 * sg(rho)", False, True, False, True),
    ("k3 * rho (k3_is)", True, True, True, True),
    ("k3 * sg(rho)", True, False, True, False),
]


def exact_kl_and_gradient(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The oracle: KL(softmax(theta) || reference) by torch.distributions, and its autograd
    gradient with respect to theta."""
    theta = theta.clone().requires_grad_(True)
    kl = kl_divergence(Categorical(logits=theta), Categorical(logits=REF_LOGITS))
    kl.backward()
    return kl.item(), theta.grad


def expected_value_and_gradient(
    estimator: Callable, off_policy: bool, theta: torch.Tensor = THETA
) -> tuple[float, torch.Tensor]:
    """sum_x q(x) k(x) over the 6 outcomes, q = mu (off-policy) or pi (on-policy) held fixed, and
    its gradient with respect to theta: the estimator's expected value and expected gradient."""
    theta = theta.clone().requires_grad_(True)
    logprobs = theta.log_softmax(-1)[None]  # one "answer" whose 6 positions are the 6 outcomes
    ref_logprobs = REF_LOGITS.log_softmax(-1)[None]
    old_logprobs = OLD_LOGITS.log_softmax(-1)[None] if off_policy else logprobs.detach()
    sampler = old_logprobs.exp()  # the sampling distribution: not differentiated
    value = (sampler * estimator(logprobs, ref_logprobs, old_logprobs)).sum()
    value.backward()
    return value.item(), theta.grad


def check_kl_gradient(estimator: Callable, off_policy: bool):
    """Raise AssertionError unless the estimator's expected gradient is the exact KL's."""
    _, expected = exact_kl_and_gradient(THETA)
    _, got = expected_value_and_gradient(estimator, off_policy)
    assert torch.allclose(got, expected, atol=1e-10), (
        f"expected gradient {got.tolist()} is not the exact KL's {expected.tolist()}")


def test_the_oracle_gradient_is_the_closed_form():
    """d KL / d theta = pi * (log(pi / ref) - KL): the brute-force gradient checked by hand."""
    kl, grad = exact_kl_and_gradient(THETA)
    probs, log_ratio = THETA.softmax(-1), THETA.log_softmax(-1) - REF_LOGITS.log_softmax(-1)
    assert kl == pytest.approx((probs * log_ratio).sum().item(), abs=1e-12)
    assert torch.allclose(grad, probs * (log_ratio - kl), atol=1e-12)
    assert kl > 0.1 and grad.abs().max() > 0.05  # far enough apart for the checks to mean much


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("name, value_on, grad_on, value_off, grad_off", TABLE,
                         ids=[row[0] for row in TABLE])
def test_which_estimators_are_unbiased(name, value_on, grad_on, value_off, grad_off, off_policy):
    """Each estimator's expected value and gradient match the exact KL's exactly where the
    table says, and are clearly off (more than 1e-3) where it says not."""
    kl, kl_grad = exact_kl_and_gradient(THETA)
    value, grad = expected_value_and_gradient(ESTIMATORS[name], off_policy)
    value_ok, grad_ok = (value_off, grad_off) if off_policy else (value_on, grad_on)
    value_gap, grad_gap = abs(value - kl), (grad - kl_grad).abs().max().item()
    assert value_gap < 1e-10 if value_ok else value_gap > 1e-3, (value, kl)
    assert grad_gap < 1e-10 if grad_ok else grad_gap > 1e-3, (grad, kl_grad)


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
def test_k3_gradient_is_the_reverse_kls(off_policy):
    """Plain k3 on-policy, and k3 * sg(rho) either way: the gradient of KL(ref || pi)."""
    theta = THETA.clone().requires_grad_(True)
    kl_divergence(Categorical(logits=REF_LOGITS), Categorical(logits=theta)).backward()
    _, grad = expected_value_and_gradient(ESTIMATORS["k3 * sg(rho)"], off_policy)
    assert torch.allclose(grad, theta.grad, atol=1e-10)
    _, grad = expected_value_and_gradient(ESTIMATORS["k3"], False)
    assert torch.allclose(grad, theta.grad, atol=1e-10)


def test_the_gradient_check_passes_k3_is_and_fails_the_detached_ratio():
    for off_policy in (False, True):
        check_kl_gradient(calc_kl_k3_is, off_policy)
        with pytest.raises(AssertionError, match="not the exact KL's"):
            check_kl_gradient(ESTIMATORS["k3 * sg(rho)"], off_policy)


# ---- k3_is behind the one seam, losses.calc_kl ----

def seam_value_and_gradient(off_policy: bool, old_given: bool = True):
    """calc_kl("k3_is", ...) at 6 positions, position x generating outcome x from logits theta:
    its sum weighted by the sampling distribution, and the gradient."""
    theta = THETA.clone().requires_grad_(True)
    logits = theta.expand(OUTCOMES, OUTCOMES)[None]  # (batch 1, gen_len 6, d_vocab 6)
    ref_logits = REF_LOGITS.expand(OUTCOMES, OUTCOMES)[None]
    gen_tokens = torch.arange(OUTCOMES)[None]
    logprobs = logits.log_softmax(-1)[0].diagonal()[None]
    old = (OLD_LOGITS if off_policy else THETA).log_softmax(-1)[None]
    kl = calc_kl("k3_is", logprobs, logits, ref_logits, gen_tokens, old if old_given else None)
    value = (old.exp() * kl).sum()
    value.backward()
    return value.item(), theta.grad


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
def test_calc_kl_k3_is_has_the_exact_kls_value_and_gradient(off_policy):
    kl, kl_grad = exact_kl_and_gradient(THETA)
    value, grad = seam_value_and_gradient(off_policy)
    assert value == pytest.approx(kl, abs=1e-10)
    assert torch.allclose(grad, kl_grad, atol=1e-10)


def test_calc_kl_k3_is_without_old_logprobs_is_on_policy():
    """No sampling log-probs given (the rollout): the ratio is 1 in value and keeps its gradient."""
    kl, kl_grad = exact_kl_and_gradient(THETA)
    value, grad = seam_value_and_gradient(False, old_given=False)
    assert value == pytest.approx(kl, abs=1e-10)
    assert torch.allclose(grad, kl_grad, atol=1e-10)
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -0.5]])
    assert torch.equal(calc_kl_k3_is(logprobs, ref, logprobs), calc_kl_k3(logprobs, ref))


def test_a_run_trains_with_k3_is(make_printable_model):
    """kl_estimator="k3_is" is a choice of RLHFArgs; a phase logs its estimate beside the exact
    KL, finite."""
    from minirlhf.args import RLHFArgs

    args = RLHFArgs(base_model="tiny", prefix="A", prepend_bos=False, batch_size=4,
                    num_minibatches=2, batches_per_learning_phase=2, gen_len=4, total_phases=1,
                    kl_estimator="k3_is", kl_coef=1.0, warmup_steps=0)
    trainer = RLHFTrainer(args, lambda texts: [float(t.count(".")) for t in texts],
                          base_model=make_printable_model(seed=3), console=Console(quiet=True))
    metrics = trainer.train_one_phase().metrics
    assert torch.isfinite(torch.tensor([metrics["charts/kl_k3_is"], metrics["charts/kl"],
                                        metrics["losses/kl_penalty"]])).all()


def test_the_learning_steps_give_k3_is_the_rollouts_logprobs(make_printable_model, monkeypatch):
    """The sampler of a learning step's tokens is the rollout's policy: the KL gets its
    log-probs (equal to the policy's at the first step, apart after updates), not None (which
    would make every step on-policy)."""
    from minirlhf import policy_outputs
    from minirlhf.args import RLHFArgs
    from minirlhf.token_stats import calc_kl_from_stats

    seen = []

    def recording_calc_kl(estimator, stats, old_logprobs=None):
        if torch.is_grad_enabled() and stats.logprobs.requires_grad:  # a learning step
            seen.append((stats.logprobs.detach(), old_logprobs))
        return calc_kl_from_stats(estimator, stats, old_logprobs)

    monkeypatch.setattr(policy_outputs, "calc_kl_from_stats", recording_calc_kl)
    args = RLHFArgs(base_model="tiny", prefix="A", prepend_bos=False, batch_size=4,
                    num_minibatches=1, batches_per_learning_phase=3, gen_len=4, total_phases=1,
                    kl_estimator="k3_is", kl_coef=1.0, warmup_steps=0, base_lr=1e-2)
    RLHFTrainer(args, lambda texts: [float(t.count(".")) for t in texts],
                base_model=make_printable_model(seed=3), console=Console(quiet=True)
                ).train_one_phase()
    assert len(seen) == 3 and all(old is not None for _, old in seen)
    assert torch.allclose(seen[0][0], seen[0][1], atol=1e-5)
    assert not torch.allclose(seen[-1][0], seen[-1][1], atol=1e-4)
