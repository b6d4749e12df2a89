"""Checks for notebook 7: critic-free advantages (GRPO, Dr. GRPO, RLOO) and the sampled KL
estimators k1, k2, k3.

The oracles are written differently from the library on purpose: the group statistics one group
at a time in plain Python floats, with each group's rows listed by index (g * group_size + j),
the sample standard deviation spelt out as a sum; RLOO's baseline as the mean of a list that
leaves the sample out; each KL estimate one token at a time with `math.exp` and `math.log` in
double precision. The cases mix prompts of very different difficulty (group means far apart), so
a statistic taken over the whole batch, or over strided rows, cannot pass by luck.
"""

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.advantages import compute_group_advantages, compute_rloo_advantages
from minirlhf.exercises.core import Case, Mistake, check_function, randn
from minirlhf.exercises.reporting import learner_facing
from minirlhf.losses import calc_kl_k1, calc_kl_k2, calc_kl_k3

PerToken = Float[Tensor, "batch gen_len"]

# ---------------------------------------------------------------- the groups


def _offset_rewards(group_size: int, offsets: list[float], seed: int) -> Float[Tensor, " batch"]:
    """Rewards of len(offsets) prompts, group_size samples each, prompt g's centred on offsets[g]
    (easy and hard prompts)."""
    noise = randn(len(offsets) * group_size, seed=seed)
    return noise + torch.tensor(offsets).repeat_interleave(group_size)


def _group_cases() -> list[Case]:
    return [
        Case("hand-worked: group_size 4, groups [1, 2, 3, 4] and [0, 0, 4, 4]",
             {"rewards": torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 4.0, 4.0]), "group_size": 4}),
        Case("3 prompts of very different difficulty, group_size 4",
             {"rewards": _offset_rewards(4, [0.0, 5.0, -3.0], seed=0), "group_size": 4}),
        Case("group_size 2, 4 prompts",
             {"rewards": _offset_rewards(2, [1.0, -2.0, 0.5, 3.0], seed=1), "group_size": 2}),
        Case("a prompt whose samples all got the same reward (its std is 0)",
             {"rewards": torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0, 3.5]), "group_size": 3}),
        Case("one group: the whole batch is one prompt's samples",
             {"rewards": randn(5, seed=2, scale=2.0), "group_size": 5}),
    ]


def _groups_of(rewards: Float[Tensor, " batch"], group_size: int) -> list[list[float]]:
    """The rewards of each prompt, read by index: group g is rows g * group_size + j."""
    values = rewards.tolist()
    return [[values[g * group_size + j] for j in range(group_size)]
            for g in range(len(values) // group_size)]


# ---------------------------------------------------------------- GRPO and Dr. GRPO


def _group_oracle(rewards: Float[Tensor, " batch"], group_size: int, scale_by_std: bool = True,
                  eps: float = 1e-6) -> Float[Tensor, " batch"]:
    advantages = []
    for group in _groups_of(rewards, group_size):
        mean = sum(group) / len(group)
        std = (sum((r - mean) ** 2 for r in group) / (len(group) - 1)) ** 0.5  # sample std
        advantages += [(r - mean) / (std + eps) if scale_by_std else r - mean for r in group]
    return torch.tensor(advantages)


def _dr_grpo_cases() -> list[Case]:
    return [Case(f"{case.name}, scale_by_std=False (Dr. GRPO)",
                 {**case.kwargs, "scale_by_std": False}) for case in _group_cases()[1:3]]


# Deliberately wrong versions, so no shape annotations.
def _grpo(rewards, group_size, scale_by_std=True, eps=1e-6, *, mean=None, std=None, dim=1,
          strided=False):
    """GRPO with one thing changed: the mean or std taken elsewhere, or the groups strided."""
    groups = rewards.view(group_size, -1) if strided else rewards.view(-1, group_size)
    dim = 0 if strided else dim
    centred = groups - (groups.mean(dim, keepdim=True) if mean is None else mean)
    if scale_by_std:
        centred = centred / ((groups.std(dim, keepdim=True) if std is None else std) + eps)
    return centred.flatten()


GROUP_MISTAKES = [
    Mistake("the mean and std are over the whole batch: each sample is compared with the other "
            "samples of its own prompt, so take them per group (rewards.view(-1, group_size), "
            "then dim=1).",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, scale_by_std, eps, mean=rewards.mean(), std=rewards.std())),
    Mistake("the mean is per group, but the std is over the whole batch: divide by each group's "
            "own std (dim=1 of the groups).",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, scale_by_std, eps, std=rewards.std())),
    Mistake("the groups are strided, not adjacent: `rewards.view(group_size, -1)` puts rows 0, "
            "n, 2n, ... in one group. A prompt's samples sit next to each other: "
            "`rewards.view(-1, group_size)` (one row per prompt), statistics over dim=1.",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, scale_by_std, eps, strided=True)),
    Mistake("a prompt whose samples all got the same reward has std 0, and 0 / 0 is NaN: add eps "
            "to the std (such a group's advantages are then 0).",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, scale_by_std, eps=0.0)),
    Mistake("GRPO divides by the sample std of the group (torch's default, correction=1), "
            "not the population std (correction=0).",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, scale_by_std, eps,
                std=rewards.view(-1, group_size).std(1, correction=0, keepdim=True))),
    Mistake("with scale_by_std=False (Dr. GRPO) the advantage is r - group mean, not divided by "
            "the std: did you ignore scale_by_std?",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, True, eps)),
    Mistake("GRPO (scale_by_std=True) divides each group by its std: did you ignore "
            "scale_by_std?",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, False, eps)),
    Mistake("return one advantage per sample, shape (batch,): flatten the groups back "
            "(.flatten(), or rearrange 'group size -> (group size)').",
            lambda rewards, group_size, scale_by_std=True, eps=1e-6: _grpo(
                rewards, group_size, scale_by_std, eps).view(-1, group_size)),
]


@learner_facing
def check_compute_group_advantages(fn: Callable[..., Tensor]) -> None:
    """Check `fn(rewards, group_size, scale_by_std=True, eps=1e-6)`: GRPO's (r - group mean) /
    (group std + eps), or Dr. GRPO's r - group mean, groups of adjacent rows."""
    check_function("compute_group_advantages", fn, compute_group_advantages, _group_oracle,
                   _group_cases() + _dr_grpo_cases(), GROUP_MISTAKES, dims="batch")


# ---------------------------------------------------------------- RLOO


def _rloo_oracle(rewards: Float[Tensor, " batch"], group_size: int) -> Float[Tensor, " batch"]:
    advantages = []
    for group in _groups_of(rewards, group_size):
        for i, reward in enumerate(group):
            others = group[:i] + group[i + 1:]
            advantages.append(reward - sum(others) / len(others))
    return torch.tensor(advantages)


def _rloo(rewards, group_size, *, divisor=None, strided=False, with_self=False):
    groups = rewards.view(group_size, -1).T if strided else rewards.view(-1, group_size)
    total = groups.sum(1, keepdim=True)
    baseline = total / group_size if with_self else (total - groups) / (
        group_size - 1 if divisor is None else divisor)
    advantages = groups - baseline
    return advantages.T.flatten() if strided else advantages.flatten()


RLOO_MISTAKES = [
    Mistake("the sample is in its own baseline: that is r - group mean (Dr. GRPO). RLOO's "
            "baseline is the mean of the *other* group_size - 1 samples: (group sum - r) / "
            "(group_size - 1).",
            lambda rewards, group_size: _rloo(rewards, group_size, with_self=True)),
    Mistake("the baseline leaves the sample out, so it averages group_size - 1 rewards: divide "
            "(group sum - r) by group_size - 1, not group_size.",
            lambda rewards, group_size: _rloo(rewards, group_size, divisor=group_size)),
    Mistake("the groups are strided, not adjacent: `rewards.view(group_size, -1)` puts rows 0, "
            "n, 2n, ... in one group. A prompt's samples sit next to each other: "
            "`rewards.view(-1, group_size)`.",
            lambda rewards, group_size: _rloo(rewards, group_size, strided=True)),
    Mistake("the baseline is the other samples of the whole batch: leave one out of its own "
            "prompt's group only.",
            lambda rewards, group_size: rewards - (rewards.sum() - rewards) / (len(rewards) - 1)),
    Mistake("the sign is flipped: the advantage is r minus the baseline.",
            lambda rewards, group_size: -_rloo(rewards, group_size)),
    Mistake("RLOO is not normalised: return r - (mean of the others), without dividing by a std.",
            lambda rewards, group_size: _rloo(rewards, group_size) / (
                rewards.view(-1, group_size).std(1).repeat_interleave(group_size) + 1e-6)),
    Mistake(GROUP_MISTAKES[-1].hint,
            lambda rewards, group_size: _rloo(rewards, group_size).view(-1, group_size)),
]


@learner_facing
def check_compute_rloo_advantages(fn: Callable[..., Tensor]) -> None:
    """Check `fn(rewards, group_size)`: r minus the mean of the other samples of its prompt."""
    check_function("compute_rloo_advantages", fn, compute_rloo_advantages, _rloo_oracle,
                   _group_cases(), RLOO_MISTAKES, dims="batch")


# ---------------------------------------------------------------- the KL estimators


def _kl_cases() -> list[Case]:
    """Log-probs of sampled tokens under the policy (with gradient) and the reference."""
    def logprobs(seed: int, shape: tuple[int, int], grad: bool = False) -> PerToken:
        logits = randn(*shape, 11, seed=seed, scale=2.0)
        tokens = torch.randint(11, (*shape, 1), generator=torch.Generator().manual_seed(seed))
        return logits.log_softmax(-1).gather(-1, tokens)[..., 0].requires_grad_(grad)

    half, quarter = math.log(0.5), math.log(0.25)
    same = logprobs(4, (2, 3))
    return [
        Case("hand-worked: p = 1/2, p_ref = 1/4 and the reverse",
             {"logprobs": torch.tensor([[half, quarter]], requires_grad=True),
              "ref_logprobs": torch.tensor([[quarter, half]])}),
        Case("batch 3, gen_len 5", {"logprobs": logprobs(0, (3, 5), grad=True),
                                    "ref_logprobs": logprobs(1, (3, 5))}),
        Case("policy equal to the reference (every estimate 0)",
             {"logprobs": same.clone().requires_grad_(True), "ref_logprobs": same}),
        Case("very unlikely tokens (log-probs near -120: exp underflows to 0 in float32)",
             {"logprobs": torch.tensor([[-120.0, -118.0]], requires_grad=True),
              "ref_logprobs": torch.tensor([[-119.0, -121.5]])}),
        Case("a batch of one, gen_len 1", {"logprobs": torch.tensor([[-2.0]], requires_grad=True),
                                           "ref_logprobs": torch.tensor([[-0.5]])}),
    ]


def _per_token(estimate: Callable[[float], float]) -> Callable[..., PerToken]:
    """An oracle applying `estimate(log r)`, log r = log p_ref(x) - log p(x), token by token."""
    def oracle(logprobs: PerToken, ref_logprobs: PerToken) -> PerToken:
        rows = [[estimate(ref - lp) for lp, ref in zip(row, ref_row, strict=True)]
                for row, ref_row in zip(logprobs.tolist(), ref_logprobs.tolist(), strict=True)]
        return torch.tensor(rows)  # computed in double, rounded to float32 at the end

    return oracle


def _differentiable(estimate: Callable[[Tensor], Tensor]) -> Callable[..., PerToken]:
    """`estimate(log r)` on float64 tensors: the oracle of the gradient (the token-by-token oracle
    computes in plain floats, which carry none)."""
    def oracle(logprobs: PerToken, ref_logprobs: PerToken) -> PerToken:
        return estimate(ref_logprobs.double() - logprobs.double())

    return oracle


def _log_r(logprobs, ref_logprobs):
    return ref_logprobs - logprobs


MEAN_HINT = ("return one estimate per token, shape (batch, gen_len): the caller takes the mean "
             "(the trainer multiplies it by kl_coef).")

K1_MISTAKES = [
    Mistake("the sign is flipped: k1 = -log r = log p(x) - log p_ref(x), which averages to "
            "KL(policy || reference).",
            lambda logprobs, ref_logprobs: _log_r(logprobs, ref_logprobs)),
    Mistake("k1 is the log of the ratio, not the ratio: log p(x) - log p_ref(x).",
            lambda logprobs, ref_logprobs: (logprobs - ref_logprobs).exp()),
    Mistake(MEAN_HINT, lambda logprobs, ref_logprobs: (logprobs - ref_logprobs).mean()),
]

K2_MISTAKES = [
    Mistake("did you forget the 1/2? k2 = (log r)^2 / 2.",
            lambda logprobs, ref_logprobs: _log_r(logprobs, ref_logprobs) ** 2),
    Mistake("k2 squares the log of the ratio, (log r)^2 / 2, not the ratio minus one.",
            lambda logprobs, ref_logprobs: 0.5 * (_log_r(logprobs, ref_logprobs).exp() - 1) ** 2),
    Mistake(MEAN_HINT,
            lambda logprobs, ref_logprobs: 0.5 * (_log_r(logprobs, ref_logprobs) ** 2).mean()),
]


def _k3(log_r):
    return log_r.exp() - 1 - log_r


K3_MISTAKES = [
    Mistake("the ratio is inverted: r = p_ref(x) / p(x) (reference over policy), so log r = "
            "ref_logprobs - logprobs. With p / p_ref the estimate is biased: its mean exceeds "
            "the KL.",
            lambda logprobs, ref_logprobs: _k3(logprobs - ref_logprobs)),
    Mistake("the sign of the log is flipped: k3 = (r - 1) - log r, which is never negative "
            "because log r <= r - 1.",
            lambda logprobs, ref_logprobs: _k3(_log_r(logprobs, ref_logprobs))
            + 2 * _log_r(logprobs, ref_logprobs)),
    Mistake("did you forget the -1? k3 = (r - 1) - log r: without it every estimate is 1 too "
            "high and the mean is KL + 1.",
            lambda logprobs, ref_logprobs: _k3(_log_r(logprobs, ref_logprobs)) + 1),
    Mistake("exp(ref_logprobs) / exp(logprobs) underflows to 0 / 0 = NaN for unlikely tokens: "
            "compute the ratio as exp(ref_logprobs - logprobs).",
            lambda logprobs, ref_logprobs: ref_logprobs.exp() / logprobs.exp() - 1
            - _log_r(logprobs, ref_logprobs)),
    Mistake(MEAN_HINT,
            lambda logprobs, ref_logprobs: _k3(_log_r(logprobs, ref_logprobs)).mean()),
    Mistake("the ratio r is detached: the value is right, but the gradient of k3 with respect to "
            "logprobs, 1 - r per token, becomes 1 (k1's), so the pull towards the reference no "
            "longer grows with the distance from it. Compute r = log_r.exp() without .detach().",
            lambda logprobs, ref_logprobs: _k3_detached(logprobs, ref_logprobs, ratio=True),
            gradient_only=True),
    Mistake("log r is detached in the `- log r` term: the value is right, but the gradient with "
            "respect to logprobs is -r per token instead of 1 - r, so it pushes every log-prob "
            "down, even where the policy equals the reference. Keep log r attached.",
            lambda logprobs, ref_logprobs: _k3_detached(logprobs, ref_logprobs, ratio=False),
            gradient_only=True),
]


def _k3_detached(logprobs, ref_logprobs, ratio: bool):
    log_r = _log_r(logprobs, ref_logprobs)
    if ratio:
        return log_r.detach().exp() - 1 - log_r
    return log_r.exp() - 1 - log_r.detach()


@learner_facing
def check_calc_kl_k1(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logprobs, ref_logprobs)`: k1 = log p(x) - log p_ref(x), per token."""
    check_function("calc_kl_k1", fn, calc_kl_k1, _per_token(lambda log_r: -log_r), _kl_cases(),
                   K1_MISTAKES, dims="batch, gen_len", grad_oracle=_differentiable(torch.neg))


@learner_facing
def check_calc_kl_k2(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logprobs, ref_logprobs)`: k2 = (log r)^2 / 2, per token."""
    check_function("calc_kl_k2", fn, calc_kl_k2, _per_token(lambda log_r: log_r * log_r / 2),
                   _kl_cases(), K2_MISTAKES, dims="batch, gen_len",
                   grad_oracle=_differentiable(lambda log_r: log_r.square() / 2))


@learner_facing
def check_calc_kl_k3(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logprobs, ref_logprobs)`: k3 = (r - 1) - log r, r = p_ref(x) / p(x), per token."""
    check_function("calc_kl_k3", fn, calc_kl_k3,
                   _per_token(lambda log_r: math.exp(log_r) - 1 - log_r), _kl_cases(),
                   K3_MISTAKES, dims="batch, gen_len",
                   grad_oracle=_differentiable(lambda log_r: torch.expm1(log_r) - log_r))
