"""Checks for notebook 3, second half: the four terms of the objective, then their signed sum.

Oracles: `torch.distributions.Categorical` for the KL penalty and the entropy (in float64, so
probabilities of 1e-60 do not underflow), `torch.nn.functional.mse_loss` for the value loss, a
per-token loop that applies the clipping rule case by case (advantage positive or negative) for
the clipped surrogate, and a table worked by hand for the sum. The trainer maximises
`clipped_surrogate - value_loss + entropy_bonus - kl_penalty`; the sum's first case uses 1, 3, 9
and 27, so that every set of flipped signs and missing terms gives a different number, and the
check can name it. Every term is checked by its gradient too (what training follows).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from torch.distributions import Categorical, kl_divergence

from minirlhf.advantages import whiten
from minirlhf.exercises.core import Case, Mistake, check_function, randn
from minirlhf.exercises.reporting import learner_facing
from minirlhf.losses import (
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
)

GenLogits = Float[Tensor, "minibatch gen_len d_vocab"]
PerToken = Float[Tensor, "minibatch gen_len"]
Scalar = Float[Tensor, ""]

# ---------------------------------------------------------------- KL penalty and entropy bonus


def _logit_cases(coef_name: str, stable_form: str = "") -> list[Case]:
    """Logits at the generated positions (with gradients), in several shapes and scales. The
    large ones (scale 100) make some probabilities exactly 0 in float32."""
    def case(name, shape, seed, scale, coef, same=False):
        logits = randn(*shape, seed=seed, scale=scale, grad=True)
        ref = logits.detach().clone() if same else randn(*shape, seed=seed + 50, scale=scale)
        return Case(name, {"logits": logits, "ref_logits": ref, coef_name: coef},
                    stable_form if scale > 10 else "")

    return [case("minibatch 2, gen_len 3, d_vocab 7", (2, 3, 7), 0, 1.0, 0.3),
            case("d_vocab 50", (3, 4, 50), 1, 2.0, 2.5),
            case("large logits, some probabilities exactly 0 in float32", (2, 2, 9), 2, 100.0,
                 1.0),
            case("policy equal to the reference", (1, 2, 5), 3, 1.0, 1.0, same=True)]


KL_STABLE_FORM = (
    "Some probabilities are exactly 0 here, so log(softmax) is -inf and 0 * -inf is NaN (and "
    "torch.distributions' kl_divergence gives inf where the reference's probability is 0). Take "
    "both log-probabilities with log_softmax and weight their difference by p = logprobs.exp(): "
    "(logprobs.exp() * (logprobs - ref_logprobs)).sum(-1).")
ENTROPY_STABLE_FORM = (
    "Some probabilities are exactly 0 here, so p.log() is -inf and 0 * -inf is NaN. Take the "
    "log-probabilities with log_softmax and p = logprobs.exp(): -(logprobs.exp() * "
    "logprobs).sum(-1) (or Categorical(logits=logits).entropy(), which does the same).")


def _kl_oracle(logits: GenLogits, ref_logits: GenLogits, kl_coef: float) -> Scalar:
    # float64, so probabilities of 1e-60 at large logits do not underflow to 0
    kl = kl_divergence(Categorical(logits=logits.double()), Categorical(logits=ref_logits.double()))
    return kl_coef * kl.mean().float()


def _kl(logits, ref_logits, kl_coef, reduce=torch.mean, log_fn=None, weigh=True, detach=False):
    log_fn = log_fn or (lambda x: x.log_softmax(-1))
    probs = (logits.detach() if detach else logits).softmax(-1) if weigh else 1.0
    return kl_coef * reduce((probs * (log_fn(logits) - log_fn(ref_logits))).sum(-1))


KL_MISTAKES = [
    Mistake("did you forget kl_coef?",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, 1.0)),
    Mistake("you computed KL(reference || policy); the penalty is KL(policy || reference), "
            "weighted by the policy's probabilities.",
            lambda logits, ref_logits, kl_coef: _kl(ref_logits, logits, kl_coef)),
    Mistake("you summed the KL over positions and samples; take the mean.",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef, torch.sum)),
    Mistake("you summed the KL over positions and averaged over samples only (what F.kl_div's "
            "reduction='batchmean' does): take the mean over positions too.",
            lambda logits, ref_logits, kl_coef: kl_coef * F.kl_div(
                ref_logits.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                reduction="batchmean")),
    Mistake("weight each token's log-ratio by the policy's probability: KL = sum over the "
            "vocabulary of p (log p - log q), not the plain sum of log p - log q.",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef, weigh=False)),
    Mistake("the sign is flipped: the penalty is a positive number, subtracted from the objective.",
            lambda logits, ref_logits, kl_coef: -_kl(logits, ref_logits, kl_coef)),
    Mistake("did you use the raw logits as log-probs? Take log_softmax first.",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef,
                                                     log_fn=lambda x: x)),
    Mistake("the probabilities that weight the log-ratio are detached: the value is right, but "
            "no gradient flows through p, and the KL's gradient is mostly that part. Training then "
            "behaves as if there were no KL penalty. Compute p from logits without .detach().",
            lambda logits, ref_logits, kl_coef: _kl(logits, ref_logits, kl_coef, detach=True),
            gradient_only=True),
]


@learner_facing
def check_calc_kl_penalty(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logits, ref_logits, kl_coef)`: kl_coef * mean KL(policy || reference)."""
    check_function("calc_kl_penalty", fn, calc_kl_penalty, _kl_oracle,
                   _logit_cases("kl_coef", KL_STABLE_FORM), KL_MISTAKES, dims="a scalar",
                   atol=1e-4)


def _entropy_oracle(logits: GenLogits, ent_coef: float) -> Scalar:
    return ent_coef * Categorical(logits=logits.double()).entropy().mean().float()


def _entropy(logits, ent_coef, reduce=torch.mean, dim=-1, sign=-1.0, detach=False):
    logprobs = logits.log_softmax(dim)
    probs = logprobs.detach().exp() if detach else logprobs.exp()
    return sign * ent_coef * reduce((probs * logprobs).sum(dim))


ENTROPY_MISTAKES = [
    Mistake("did you forget ent_coef?", lambda logits, ent_coef: _entropy(logits, 1.0)),
    Mistake("the sign is flipped: entropy is -sum(p log p), a positive number.",
            lambda logits, ent_coef: _entropy(logits, ent_coef, sign=1.0)),
    Mistake("you summed over positions and samples; take the mean.",
            lambda logits, ent_coef: _entropy(logits, ent_coef, torch.sum)),
    Mistake("softmax over the wrong dimension: the distribution is over the vocabulary (dim=-1).",
            lambda logits, ent_coef: _entropy(logits, ent_coef, dim=1)),
    Mistake("you averaged -p log p over the vocabulary too: sum it over the vocabulary (dim=-1), "
            "then take the mean over positions and samples.",
            lambda logits, ent_coef: -ent_coef * (logits.softmax(-1) * logits.log_softmax(-1))
            .mean()),
    Mistake("the probabilities p in -sum(p log p) are detached: the value is right, but the "
            "gradient is not the entropy's (it misses the part through p). Compute p from the "
            "logits without .detach().",
            lambda logits, ent_coef: _entropy(logits, ent_coef, detach=True), gradient_only=True),
]


@learner_facing
def check_calc_entropy_bonus(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logits, ent_coef)`: ent_coef * mean entropy of the policy."""
    cases = [Case(c.name, {"logits": c.kwargs["logits"], "ent_coef": c.kwargs["kl_coef"]},
                  c.stability)
             for c in _logit_cases("kl_coef", ENTROPY_STABLE_FORM)]
    check_function("calc_entropy_bonus", fn, calc_entropy_bonus, _entropy_oracle, cases,
                   ENTROPY_MISTAKES, dims="a scalar", atol=1e-4)


# ---------------------------------------------------------------- value-function loss


def _value_loss_oracle(values: PerToken, mb_returns: PerToken, vf_coef: float) -> Scalar:
    return vf_coef * 0.5 * F.mse_loss(values, mb_returns)


def _squared_error(values, mb_returns):
    return (values - mb_returns).pow(2)


VALUE_LOSS_MISTAKES = [
    Mistake("did you forget the 1/2?",
            lambda values, mb_returns, vf_coef: vf_coef
            * _squared_error(values, mb_returns).mean()),
    Mistake("did you forget vf_coef?",
            lambda values, mb_returns, vf_coef: 0.5 * _squared_error(values, mb_returns).mean()),
    Mistake("you summed the squared errors; take the mean.",
            lambda values, mb_returns, vf_coef: 0.5 * vf_coef
            * _squared_error(values, mb_returns).sum()),
    Mistake("the sign is flipped: return the positive loss; the trainer subtracts it.",
            lambda values, mb_returns, vf_coef: -0.5 * vf_coef
            * _squared_error(values, mb_returns).mean()),
    Mistake("you used the absolute error; the value loss is the squared error.",
            lambda values, mb_returns, vf_coef: 0.5 * vf_coef
            * (values - mb_returns).abs().mean()),
]


@learner_facing
def check_calc_value_function_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(values, mb_returns, vf_coef)`: vf_coef * 1/2 * mean squared error."""
    cases = [Case(name, {"values": randn(*shape, seed=i, grad=True),
                         "mb_returns": randn(*shape, seed=i + 9, scale=2.0), "vf_coef": coef})
             for i, (name, shape, coef) in enumerate([
                 ("minibatch 4, gen_len 3", (4, 3), 0.15), ("minibatch 1, gen_len 1", (1, 1), 1.0),
                 ("minibatch 2, gen_len 6", (2, 6), 0.5)])]

    check_function("calc_value_function_loss", fn, calc_value_function_loss, _value_loss_oracle,
                   cases, VALUE_LOSS_MISTAKES, dims="a scalar")


# ---------------------------------------------------------------- clipped surrogate objective


def _surrogate_oracle(logprobs: PerToken, mb_logprobs: PerToken, mb_advantages: PerToken,
                      clip_coef: float) -> Scalar:
    """The pessimistic bound written case by case, token by token."""
    advantages = mb_advantages.flatten().tolist()
    ratios = (logprobs - mb_logprobs).exp().flatten()
    terms = []
    for ratio, advantage in zip(ratios, advantages, strict=True):
        if advantage >= 0:  # a good action: gain nothing past a ratio of 1 + clip_coef
            terms.append(torch.clamp(ratio, max=1 + clip_coef) * advantage)
        else:  # a bad action: nothing gained below a ratio of 1 - clip_coef
            terms.append(torch.clamp(ratio, min=1 - clip_coef) * advantage)
    return torch.stack(terms).mean()


def _whiten(mb_advantages, eps=1e-8, normalize="population"):
    if normalize == "population":
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std(correction=0)
                                                                  + eps)
    elif normalize == "sample":
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + eps)
    elif normalize == "per row":
        mean, std = mb_advantages.mean(-1, keepdim=True), mb_advantages.std(-1, correction=0,
                                                                            keepdim=True)
        mb_advantages = (mb_advantages - mean) / (std + eps)
    return mb_advantages


def _surrogate(logprobs, mb_logprobs, mb_advantages, clip_coef, *, pick=torch.minimum,
               ratio=None, clip_advantages=False):
    ratio = (logprobs - mb_logprobs).exp() if ratio is None else ratio
    if clip_advantages:
        clipped = ratio * mb_advantages.clamp(1 - clip_coef, 1 + clip_coef)
    else:
        clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * mb_advantages
    return pick(ratio * mb_advantages, clipped).mean()


WHITEN_MISTAKES = [
    Mistake("did you use the sample std (correction=1)? A minibatch of one token then gives NaN: "
            "use advantages.std(correction=0).",
            lambda advantages, eps=1e-8: _whiten(advantages, eps, normalize="sample")),
    Mistake("you whitened each sample (row) separately: use the mean and std over the whole "
            "minibatch, every token of every sample together.",
            lambda advantages, eps=1e-8: _whiten(advantages, eps, normalize="per row")),
    Mistake("you left the mean in: subtract it before dividing by the std.",
            lambda advantages, eps=1e-8: advantages / (advantages.std(correction=0) + eps)),
    Mistake("did you forget eps? A minibatch of one token, or equal advantages, has std 0, and "
            "0 / 0 is NaN: divide by advantages.std(correction=0) + eps.",
            lambda advantages, eps=1e-8: _whiten(advantages, 0.0)),
]


def _whiten_oracle(advantages: PerToken, eps: float = 1e-8) -> PerToken:
    values = advantages.flatten().tolist()
    mean = sum(values) / len(values)
    std = (sum((a - mean) ** 2 for a in values) / len(values)) ** 0.5
    return torch.tensor([(a - mean) / (std + eps) for a in values]).reshape(advantages.shape)


@learner_facing
def check_whiten(fn: Callable[..., Tensor]) -> None:
    """Check `fn(advantages, eps=1e-8)`: mean 0 and population std 1 over the whole minibatch."""
    cases = [Case(name, {"advantages": advantages}) for name, advantages in [
        ("minibatch 4, gen_len 5", randn(4, 5, seed=0, scale=3.0)),
        ("rows with different means", randn(3, 4, seed=1) + torch.arange(3.0)[:, None] * 5),
        ("a minibatch of one token", torch.tensor([[2.5]])),
        ("equal advantages", torch.full((2, 3), 1.5))]]
    check_function("whiten", fn, whiten, _whiten_oracle, cases, WHITEN_MISTAKES,
                   dims="(minibatch, gen_len)")


SURROGATE_MISTAKES = [
    Mistake("you maximised instead of minimised: PPO takes torch.minimum of the unclipped and "
            "clipped terms (the pessimistic bound), not torch.maximum.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, pick=torch.maximum)),
    Mistake("the advantages come whitened already (the learning loop does it): do not "
            "normalise them again here.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef: _surrogate(
                logprobs, mb_logprobs, _whiten(mb_advantages), clip_coef)),
    Mistake("the ratio is upside down: it is exp(logprobs - mb_logprobs), new over old.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef: _surrogate(
                mb_logprobs, logprobs, mb_advantages, clip_coef)),
    Mistake("the ratio of probabilities is exp(logprobs - mb_logprobs), not logprobs / "
            "mb_logprobs.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, ratio=logprobs / mb_logprobs)),
    Mistake("you clipped the advantages; clip the ratio to [1 - clip_coef, 1 + clip_coef].",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, clip_advantages=True)),
    Mistake("did you forget the clipped term? The objective is the minimum of ratio * A and "
            "clip(ratio) * A.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef: _surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef, pick=lambda a, b: a)),
    Mistake("the sign is flipped: return the surrogate itself (the trainer adds it to the "
            "objective it maximises), not its negative.",
            lambda logprobs, mb_logprobs, mb_advantages, clip_coef: -_surrogate(
                logprobs, mb_logprobs, mb_advantages, clip_coef)),
]


@learner_facing
def check_calc_clipped_surrogate_objective(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logprobs, mb_logprobs, mb_advantages, clip_coef)`: PPO's objective."""
    def case(name, shape, seed, clip_coef, spread=0.5, advantages=None):
        mb_logprobs = -randn(*shape, seed=seed).abs() - 0.5
        logprobs = (mb_logprobs + randn(*shape, seed=seed + 1, scale=spread)).requires_grad_(True)
        advantages = randn(*shape, seed=seed + 2, scale=3.0) if advantages is None else advantages
        return Case(name, {"logprobs": logprobs, "mb_logprobs": mb_logprobs,
                           "mb_advantages": advantages, "clip_coef": clip_coef})

    cases = [case("minibatch 4, gen_len 5, ratios inside and outside the clip range",
                  (4, 5), 0, 0.2),
             case("clip_coef 0.1", (3, 6), 10, 0.1, spread=0.3),
             case("a minibatch of one token", (1, 1), 20, 0.2),
             case("equal advantages", (2, 3), 30, 0.2, advantages=torch.full((2, 3), 1.5))]
    check_function("calc_clipped_surrogate_objective", fn, calc_clipped_surrogate_objective,
                   _surrogate_oracle, cases, SURROGATE_MISTAKES, dims="a scalar")


# ---------------------------------------------------------------- the objective, with its signs

TERMS = ("clipped_surrogate", "value_loss", "entropy_bonus", "kl_penalty")
SIGNS = (+1.0, -1.0, +1.0, -1.0)

# (clipped_surrogate, value_loss, entropy_bonus, kl_penalty) -> the objective, worked by hand.
# 1, 3, 9, 27: each sum of the terms with signs +1, -1 or 0 is a different number (balanced
# ternary), so two flipped signs cannot pass for a missing term (as 1 - 2 - 4 + 8 = 1 - 2 + 4 did
# with powers of two); the other rows have unrelated magnitudes to confirm the mistake named.
OBJECTIVE_TABLE = {
    (1.0, 3.0, 9.0, 27.0): -20.0,  # 1 - 3 + 9 - 27
    (-0.5, 0.25, 2.0, 0.75): 0.5,  # -0.5 - 0.25 + 2 - 0.75
    (0.2, 1.7, 0.05, 3.1): -4.55,  # 0.2 - 1.7 + 0.05 - 3.1
}


def _objective_cases() -> list[Case]:
    return [Case(f"clipped_surrogate={s}, value_loss={v}, entropy_bonus={e}, kl_penalty={k}",
                 {name: torch.tensor(x, requires_grad=True)
                  for name, x in zip(TERMS, (s, v, e, k), strict=True)})
            for (s, v, e, k) in OBJECTIVE_TABLE]


def _table_oracle(clipped_surrogate: Float[Tensor, ""], value_loss: Float[Tensor, ""],
                  entropy_bonus: Float[Tensor, ""], kl_penalty: Float[Tensor, ""]
                  ) -> Float[Tensor, ""]:
    terms = [t.item() for t in (clipped_surrogate, value_loss, entropy_bonus, kl_penalty)]
    row = next(key for key in OBJECTIVE_TABLE
               if all(abs(a - b) < 1e-6 for a, b in zip(key, terms, strict=True)))
    return torch.tensor(OBJECTIVE_TABLE[row])


def _weighted(signs: tuple[float, ...]) -> Callable[..., Tensor]:
    """The sum of the four terms with the given signs (0 leaves a term out)."""
    def objective(clipped_surrogate, value_loss, entropy_bonus, kl_penalty):
        terms = (clipped_surrogate, value_loss, entropy_bonus, kl_penalty)
        return sum(sign * term for sign, term in zip(signs, terms, strict=True))

    return objective


def _changed(index: int, sign: float) -> tuple[float, ...]:
    return tuple(sign if i == index else s for i, s in enumerate(SIGNS))


OBJECTIVE_MISTAKES = [
    Mistake("you returned a loss to minimise (every sign flipped): the trainer maximises the "
            "objective, clipped_surrogate - value_loss + entropy_bonus - kl_penalty.",
            _weighted(tuple(-s for s in SIGNS))),
    *[Mistake(f"the sign of {name} is flipped: it is {'added' if sign > 0 else 'subtracted'} "
              f"({'a reward to maximise' if sign > 0 else 'a cost'}).",
              _weighted(_changed(i, -sign)))
      for i, (name, sign) in enumerate(zip(TERMS, SIGNS, strict=True))],
    *[Mistake(f"you left out {name}: the objective has all four terms.",
              _weighted(_changed(i, 0.0))) for i, name in enumerate(TERMS)],
    *[Mistake(f"the signs of {TERMS[i]} and {TERMS[j]} are both flipped: the objective is "
              "clipped_surrogate - value_loss + entropy_bonus - kl_penalty.",
              _weighted(tuple(-s if k in (i, j) else s for k, s in enumerate(SIGNS))))
      for i in range(4) for j in range(i + 1, 4)],
]


calc_rlhf_objective = _weighted(SIGNS)
"""The reference: what `RLHFTrainer.compute_rlhf_objective` adds up from the four terms."""


@learner_facing
def check_calc_rlhf_objective(fn: Callable[..., Tensor]) -> None:
    """Check `fn(clipped_surrogate, value_loss, entropy_bonus, kl_penalty)`: the objective the
    trainer maximises, with its gradient kept."""
    check_function("calc_rlhf_objective", fn, calc_rlhf_objective, _table_oracle,
                   _objective_cases(), OBJECTIVE_MISTAKES, dims="a scalar",
                   grad_oracle=lambda surrogate, value, entropy, kl: surrogate - value + entropy
                   - kl)
