"""Checks for notebook 7's KL lab: k3 times the importance ratio (`calc_kl_k3_is`), and the
expected gradient of a KL estimator used as a loss (`expected_kl_gradient`).

The oracles are written differently from the library on purpose: k3 * ratio one token at a time
with `math.exp` in double precision; the expected gradient as a loop over the outcomes, each
outcome's estimate differentiated on its own (`torch.autograd.grad`) and weighted by its sampling
probability in plain floats, where the solution differentiates one weighted sum. The cases mix
on-policy (the sampler is the policy) and off-policy (an older policy sampled).
"""

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.exercises.core import Case, Mistake, check_function, randn
from minirlhf.exercises.reporting import learner_facing
from minirlhf.losses import calc_kl_k1, calc_kl_k3, calc_kl_k3_is

PerToken = Float[Tensor, "batch gen_len"]
Logits = Float[Tensor, " outcomes"]
Estimator = Callable[[PerToken, PerToken, PerToken], PerToken]

# ---------------------------------------------------------------- k3 times the ratio


def _k3_is_cases() -> list[Case]:
    def logprobs(seed: int, grad: bool = False) -> PerToken:
        return randn(2, 4, 9, seed=seed, scale=2.0).log_softmax(-1)[..., 0].requires_grad_(grad)

    on_policy = logprobs(0)
    return [
        Case("off-policy: an older policy sampled", {
            "logprobs": logprobs(0, grad=True), "ref_logprobs": logprobs(1),
            "old_logprobs": logprobs(2)}),
        Case("on-policy: old_logprobs equal to logprobs (ratio 1)", {
            "logprobs": on_policy.clone().requires_grad_(True), "ref_logprobs": logprobs(3),
            "old_logprobs": on_policy.clone()}),
        Case("hand-worked: p = 1/2, mu = 1/4, p_ref = 1/8", {
            "logprobs": torch.tensor([[math.log(0.5)]], requires_grad=True),
            "ref_logprobs": torch.tensor([[math.log(0.125)]]),
            "old_logprobs": torch.tensor([[math.log(0.25)]])}),
    ]


def _k3_is_oracle(logprobs: PerToken, ref_logprobs: PerToken, old_logprobs: PerToken) -> PerToken:
    """(p / mu) * ((r - 1) - log r), r = p_ref / p, token by token in double precision."""
    rows = [[math.exp(lp - old) * (math.exp(ref - lp) - 1 - (ref - lp))
             for lp, ref, old in zip(*columns, strict=True)]
            for columns in zip(logprobs.tolist(), ref_logprobs.tolist(), old_logprobs.tolist(),
                               strict=True)]
    return torch.tensor(rows)


def _k3_is_grad_oracle(logprobs, ref_logprobs, old_logprobs):
    log_r = ref_logprobs.double() - logprobs.double()
    return (logprobs.double() - old_logprobs.double()).exp() * (torch.expm1(log_r) - log_r)


def _k3(logprobs, ref_logprobs):
    log_r = ref_logprobs - logprobs
    return log_r.exp() - 1 - log_r


K3_IS_MISTAKES = [
    Mistake("the ratio pi / mu is detached: the value is right, but the expected gradient is then "
            "k3's, the gradient of the *reverse* KL(ref || pi), on-policy and off. Keep "
            "(logprobs - old_logprobs).exp() attached: its gradient is what corrects k3's.",
            lambda logprobs, ref_logprobs, old_logprobs:
            (logprobs - old_logprobs).exp().detach() * _k3(logprobs, ref_logprobs),
            gradient_only=True),
    Mistake("the ratio is inverted: the importance weight is pi(x) / mu(x), the policy being "
            "trained over the one that sampled, exp(logprobs - old_logprobs).",
            lambda logprobs, ref_logprobs, old_logprobs:
            (old_logprobs - logprobs).exp() * _k3(logprobs, ref_logprobs)),
    Mistake("the ratio is missing: that is plain k3, whose expected value off-policy is not the "
            "KL and whose gradient is the reverse KL's.",
            lambda logprobs, ref_logprobs, old_logprobs: _k3(logprobs, ref_logprobs)),
]


@learner_facing
def check_calc_kl_k3_is(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logprobs, ref_logprobs, old_logprobs)`: (pi / mu) * k3, per token."""
    check_function("calc_kl_k3_is", fn, calc_kl_k3_is, _k3_is_oracle, _k3_is_cases(),
                   K3_IS_MISTAKES, dims="batch, gen_len", grad_oracle=_k3_is_grad_oracle)


# ---------------------------------------------------------------- the expected gradient


def expected_kl_gradient(
    estimator: Estimator, theta: Logits, ref_logits: Logits, old_theta: Logits | None = None
) -> Logits:
    """The expected gradient with respect to theta of `estimator` used as a loss: the gradient
    of sum_x q(x) k(x), q (the sampler: softmax(old_theta), or the policy softmax(theta) itself
    when None) held fixed. The estimator reads (logprobs, ref_logprobs, old_logprobs), one
    position per outcome."""
    theta = theta.detach().requires_grad_(True)
    logprobs = theta.log_softmax(-1)
    old_logprobs = logprobs.detach() if old_theta is None else old_theta.log_softmax(-1)
    estimates = estimator(logprobs[None], ref_logits.log_softmax(-1)[None], old_logprobs[None])
    (old_logprobs.exp() * estimates[0]).sum().backward()
    return theta.grad


def _gradient_oracle(estimator: Estimator, theta: Logits, ref_logits: Logits,
                     old_theta: Logits | None = None) -> Logits:
    """One outcome at a time: the gradient of its own estimate, times its sampling probability
    (a plain float), summed."""
    sampler = (theta if old_theta is None else old_theta).double().softmax(-1).tolist()
    total = torch.zeros(len(sampler), dtype=torch.float64)
    for x, weight in enumerate(sampler):
        leaf = theta.detach().double().requires_grad_(True)
        logprobs = leaf.log_softmax(-1)
        old = logprobs.detach() if old_theta is None else old_theta.double().log_softmax(-1)
        estimate = estimator(logprobs[None], ref_logits.double().log_softmax(-1)[None],
                             old[None])[0, x]
        total += weight * torch.autograd.grad(estimate, leaf)[0]
    return total.float()


def _estimator(name: str) -> Estimator:
    def k1(lp, ref, old):
        return calc_kl_k1(lp, ref)

    def k3(lp, ref, old):
        return calc_kl_k3(lp, ref)

    return {"k1": k1, "k3": k3, "k3_is": calc_kl_k3_is}[name]


def _gradient_cases() -> list[Case]:
    theta, ref, old = (randn(7, seed=seed, scale=1.5) for seed in (10, 11, 12))
    return [Case(f"{name}, {where}", {"estimator": _estimator(name), "theta": theta,
                                      "ref_logits": ref, "old_theta": old_theta})
            for name in ("k3", "k3_is", "k1")
            for where, old_theta in (("on-policy", None), ("off-policy", old))]


def _sampler_differentiated(estimator, theta, ref_logits, old_theta=None):
    theta = theta.detach().requires_grad_(True)
    logprobs = theta.log_softmax(-1)
    old = logprobs if old_theta is None else old_theta.log_softmax(-1)
    (old.exp() * estimator(logprobs[None], ref_logits.log_softmax(-1)[None], old[None].detach()
                           )[0]).sum().backward()
    return theta.grad


def _unweighted(estimator, theta, ref_logits, old_theta=None):
    theta = theta.detach().requires_grad_(True)
    logprobs = theta.log_softmax(-1)
    old = logprobs.detach() if old_theta is None else old_theta.log_softmax(-1)
    estimator(logprobs[None], ref_logits.log_softmax(-1)[None], old[None]).mean().backward()
    return theta.grad


GRADIENT_MISTAKES = [
    Mistake("the sampling probabilities are differentiated: the samples x are drawn, not "
            "computed, so the loss's gradient flows only through the estimate at x. Hold q fixed "
            "(on-policy: logprobs.detach().exp()).", _sampler_differentiated),
    Mistake("the estimates are averaged over the outcomes: an expectation weights each outcome "
            "by its sampling probability q(x) = exp(old_logprobs).", _unweighted),
]


@learner_facing
def check_expected_kl_gradient(fn: Callable[..., Tensor]) -> None:
    """Check `fn(estimator, theta, ref_logits, old_theta)`: the expected gradient wrt theta."""
    check_function("expected_kl_gradient", fn, expected_kl_gradient, _gradient_oracle,
                   _gradient_cases(), GRADIENT_MISTAKES, dims="outcomes")
