"""Checks for notebook 8: DPO's sequence log-probs and its loss (with IPO's).

The oracles are written differently from the library on purpose: the log-prob of a response one
token at a time with `torch.distributions.Categorical` in float64, reading the masks position by
position; the loss one pair at a time in plain Python floats, with the stable form of
log(1 + e^-x) spelt out. The padded cases mark the response from its first token to the end of
the row, padding included, so that only the attention mask keeps padding out, and put NaN in the
padding's logits, as a left-padded row's pads may hold.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.distributions import Categorical

from minirlhf.exercises.core import Case, Mistake, check_function, randn
from minirlhf.exercises.reporting import learner_facing
from minirlhf.pairs.dpo import calc_dpo_loss, get_sequence_logprobs

# ---------------------------------------------------------------- sequence log-probs


def _sequence_oracle(
    logits: Float[Tensor, "batch seq d_vocab"], tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"], response_mask: Int[Tensor, "batch seq"],
) -> Float[Tensor, " batch"]:
    totals = []
    for i in range(tokens.shape[0]):
        total = torch.zeros((), dtype=torch.float64)  # kept as a tensor: it has a gradient
        for s in range(1, tokens.shape[1]):  # token s is scored by the logits at s - 1
            if response_mask[i, s] == 1 and attention_mask[i, s] == 1:
                total = total + Categorical(logits=logits[i, s - 1].double()).log_prob(tokens[i, s])
        totals.append(total)
    return torch.stack(totals).float()


def _batch(prompt_lens: list[int], response_lens: list[int], seq: int, side: str, seed: int,
           nan_padding: bool = False) -> dict[str, Tensor]:
    """Rows of prompt + response over an 11-token vocabulary, padded to `seq` on `side`. The
    response mask is 1 from the response's first token to the end of the row."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(prompt_lens)
    tokens = torch.randint(11, (batch, seq), generator=generator)
    attention_mask = torch.zeros(batch, seq, dtype=torch.long)
    response_mask = torch.zeros(batch, seq, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        start = 0 if side == "right" else seq - p - r
        attention_mask[i, start : start + p + r] = 1
        response_mask[i, start + p :] = 1
    logits = torch.randn(batch, seq, 11, generator=generator) * 3
    if nan_padding:
        logits[attention_mask == 0] = float("nan")
    return {"logits": logits.requires_grad_(True), "tokens": tokens,
            "attention_mask": attention_mask, "response_mask": response_mask}


def _sequence_cases() -> list[Case]:
    return [
        Case("no padding: prompts of 2 tokens, responses of 3", _batch([2, 2], [3, 3], 5, "right",
                                                                        seed=0)),
        Case("right padding: prompt lengths 2, 3, 1, response lengths 3, 1, 4 (the response mask "
             "runs on over the padding)", _batch([2, 3, 1], [3, 1, 4], 6, "right", seed=1)),
        Case("left padding", _batch([2, 3, 1], [3, 1, 4], 6, "left", seed=2)),
        Case("left padding whose logits are NaN (what a pad that attends to nothing may hold)",
             _batch([2, 1], [2, 4], 6, "left", seed=3, nan_padding=True)),
        Case("a batch of one, a one-token response", _batch([3], [1], 4, "right", seed=4)),
    ]


# Deliberately wrong versions, so no shape annotations.
def _token_logprobs(logits, tokens, shift=True, log_fn=None):
    """The log-prob of each token under the logits that predict it (`shift`: one position
    before it), with a column of zeros in front so it lines up with `tokens`."""
    scores = (log_fn or (lambda x: x.log_softmax(-1)))(logits)
    if not shift:
        return scores.gather(-1, tokens[..., None])[..., 0]
    picked = scores[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return F.pad(picked, (1, 0))


def _sequence(logits, tokens, attention_mask, response_mask, *, counted=None, shift=True,
              log_fn=None, reduce="sum", multiply=False):
    per_token = _token_logprobs(logits, tokens, shift, log_fn)
    counted = (attention_mask * response_mask) if counted is None else counted
    counted = counted.clone()
    counted[:, 0] = 0
    kept = per_token * counted if multiply else torch.where(counted.bool(), per_token, 0.0)
    if reduce == "mean":
        return kept.sum(-1) / counted.sum(-1)
    return kept.sum() if reduce == "all" else kept.sum(-1)


SEQUENCE_MISTAKES = [  # NaN * 0 first: on NaN padding, counting the prompt gives NaN too
    Mistake("padding's logits may be NaN, and NaN * 0 is NaN: mask with torch.where(mask, "
            "logprobs, 0.0) instead of multiplying by the mask.",
            lambda logits, tokens, attention_mask, response_mask: _sequence(
                logits, tokens, attention_mask, response_mask, multiply=True)),
    Mistake("the prompt's tokens are counted: log pi(response | prompt) sums the response's "
            "tokens only (where response_mask is 1).",
            lambda logits, tokens, attention_mask, response_mask: _sequence(
                logits, tokens, attention_mask, response_mask, counted=attention_mask)),
    Mistake("did you average over the response's tokens? The sequence log-prob is their sum "
            "(log of a product of probabilities); a mean would favour long responses no more "
            "than short ones, which is not the likelihood DPO's derivation uses.",
            lambda logits, tokens, attention_mask, response_mask: _sequence(
                logits, tokens, attention_mask, response_mask, reduce="mean")),
    Mistake("off by one: the logits at position s predict token s + 1, so token s is scored by "
            "logits[:, s - 1] (compare logits[:, :-1] with tokens[:, 1:]).",
            lambda logits, tokens, attention_mask, response_mask: _sequence(
                logits, tokens, attention_mask, response_mask, shift=False)),
    Mistake("did you gather from the raw logits? Take log_softmax over the vocabulary first.",
            lambda logits, tokens, attention_mask, response_mask: _sequence(
                logits, tokens, attention_mask, response_mask, log_fn=lambda x: x)),
    Mistake("padding is counted: the response mask may run on over the padding, so keep only "
            "the tokens where the attention mask is 1 too.",
            lambda logits, tokens, attention_mask, response_mask: _sequence(
                logits, tokens, attention_mask, response_mask, counted=response_mask)),
    Mistake("return one log-prob per sequence, shape (batch,): sum over the positions only "
            "(dim=-1).",
            lambda logits, tokens, attention_mask, response_mask: _sequence(
                logits, tokens, attention_mask, response_mask, reduce="all")),
]


@learner_facing
def check_get_sequence_logprobs(fn: Callable[..., Tensor]) -> None:
    """Check `fn(logits, tokens, attention_mask, response_mask)`: the sum of the response's
    token log-probs, padding and prompt left out."""
    check_function("get_sequence_logprobs", fn, get_sequence_logprobs, _sequence_oracle,
                   _sequence_cases(), SEQUENCE_MISTAKES, dims="batch", atol=1e-4)


# ---------------------------------------------------------------- the loss


def reference_dpo_loss(
    policy_chosen_logps: Float[Tensor, " batch"], policy_rejected_logps: Float[Tensor, " batch"],
    ref_chosen_logps: Float[Tensor, " batch"], ref_rejected_logps: Float[Tensor, " batch"],
    beta: float, loss_type: str = "sigmoid",
) -> Float[Tensor, ""]:
    """minirlhf's `calc_dpo_loss`, its loss only (the exercise leaves the implicit rewards out)."""
    return calc_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps, beta, loss_type).loss


def _softplus_of_minus(x: float) -> float:
    """log(1 + e^-x), without overflow for large |x|."""
    return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))


def _dpo_oracle(
    policy_chosen_logps: Float[Tensor, " batch"], policy_rejected_logps: Float[Tensor, " batch"],
    ref_chosen_logps: Float[Tensor, " batch"], ref_rejected_logps: Float[Tensor, " batch"],
    beta: float, loss_type: str = "sigmoid",
) -> Float[Tensor, ""]:
    losses = []
    for pc, pr, rc, rr in zip(policy_chosen_logps.tolist(), policy_rejected_logps.tolist(),
                              ref_chosen_logps.tolist(), ref_rejected_logps.tolist(), strict=True):
        h = (pc - rc) - (pr - rr)  # how much more the policy moved towards chosen than rejected
        losses.append((h - 1 / (2 * beta)) ** 2 if loss_type == "ipo"
                      else _softplus_of_minus(beta * h))
    return torch.tensor(sum(losses) / len(losses))


def _dpo_gradient_oracle(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float,
                         loss_type: str = "sigmoid") -> Float[Tensor, ""]:
    """The same loss in float64 tensors, for its gradient: -log σ(x) = log(e^0 + e^-x)."""
    h = (pc.double() - rc.double()) - (pr.double() - rr.double())
    zero = torch.zeros_like(h)
    losses = (h - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else torch.logaddexp(zero, -beta * h)
    return losses.mean()


def _logps(n: int, seed: int, grad: bool = False) -> list[Tensor]:
    """Summed log-probs of n pairs: policy chosen, policy rejected (with gradient), reference
    chosen, reference rejected."""
    values = [-(randn(n, seed=seed + i, scale=3.0).abs() + 5.0) for i in range(4)]
    return [v.requires_grad_(grad and i < 2) for i, v in enumerate(values)]


def _dpo_case(name: str, logps: list[Tensor], beta: float, loss_type: str = "sigmoid") -> Case:
    keys = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
            "ref_rejected_logps"]
    return Case(name, {**dict(zip(keys, logps, strict=True)), "beta": beta,
                       "loss_type": loss_type})


def _dpo_cases() -> list[Case]:
    hand = [torch.tensor(v, requires_grad=i < 2) for i, v in enumerate(
        ([-10.0, -12.0], [-12.0, -10.0], [-10.5, -11.0], [-11.5, -11.0]))]
    far = [torch.tensor(v, requires_grad=i < 2) for i, v in enumerate(
        ([-5.0, -900.0], [-900.0, -5.0], [-10.0, -10.0], [-10.0, -10.0]))]
    return [
        _dpo_case("hand-worked: h = 1 and h = -2, beta 0.1 (losses 0.6444 and 0.7981)", hand,
                  0.1),
        _dpo_case("6 pairs, beta 0.3", _logps(6, seed=0, grad=True), 0.3),
        _dpo_case("6 pairs, beta 2", _logps(6, seed=10, grad=True), 2.0),
        _dpo_case("log-ratios far apart (beta h = +-179)", far, 0.2),
        _dpo_case("a batch of one, beta 0.5", _logps(1, seed=20, grad=True), 0.5),
        _dpo_case("IPO, hand-worked pairs, beta 0.1 (losses 16 and 49)", hand, 0.1, "ipo"),
        _dpo_case("IPO, 6 pairs, beta 0.5", _logps(6, seed=30, grad=True), 0.5, "ipo"),
    ]


def _h(pc, pr, rc, rr, ref_sign=-1.0):
    return (pc - pr) + ref_sign * (rc - rr)


def _dpo(pc, pr, rc, rr, beta, loss_type="sigmoid", *, h=None, inside=None, outside=1.0,
         log_fn=F.logsigmoid, reduce=torch.mean, sign=-1.0, ipo_target=None, ipo_beta=False):
    """The DPO (or IPO) loss with one thing changed."""
    h = _h(pc, pr, rc, rr) if h is None else h
    if loss_type == "ipo":
        target = 1 / (2 * beta) if ipo_target is None else ipo_target
        return reduce(((beta * h if ipo_beta else h) - target) ** 2)
    return reduce(sign * outside * log_fn((beta * h) if inside is None else inside))


DPO_MISTAKES = [
    Mistake("beta belongs inside the log-sigmoid, multiplying h: -log sigmoid(beta h), not "
            "-beta log sigmoid(h).",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, inside=_h(pc, pr, rc, rr), outside=beta)),
    Mistake("h is multiplied by beta, not divided: -log sigmoid(beta h).",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, inside=_h(pc, pr, rc, rr) / beta)),
    Mistake("the reference's log-ratio is added: h = (log pi(y_w) - log pi(y_l)) - "
            "(log pi_ref(y_w) - log pi_ref(y_l)), the reference's gap subtracted.",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, h=_h(pc, pr, rc, rr, ref_sign=1.0))),
    Mistake("did you leave out the reference? The implicit reward is beta (log pi - log pi_ref): "
            "subtract the reference's log-probs.",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, h=pc - pr)),
    Mistake("h has the wrong sign: chosen minus rejected, policy minus reference. (Chosen and "
            "rejected swapped, or policy and reference swapped, both do this.)",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, h=-_h(pc, pr, rc, rr))),
    Mistake("did you forget the minus? log sigmoid is negative; the loss is -log sigmoid(beta h).",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, sign=1.0)),
    Mistake("did you sum over the pairs? Take the mean.",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, reduce=torch.sum)),
    Mistake("torch.log(torch.sigmoid(x)) underflows to log(0) = -inf for very negative x: use "
            "F.logsigmoid.",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, log_fn=lambda x: torch.sigmoid(x).log())),
    Mistake("that is the sigmoid, not its log: the loss is -log sigmoid(beta h).",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, log_fn=torch.sigmoid)),
    Mistake("with loss_type='ipo' the loss is (h - 1 / (2 beta))^2: did you ignore loss_type?",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(pc, pr, rc, rr, beta)),
    Mistake("IPO's target for h is 1 / (2 beta), not 1 / beta.",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, ipo_target=1 / beta)),
    Mistake("IPO's target for h is 1 / (2 beta), not beta / 2.",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, ipo_target=beta / 2)),
    Mistake("IPO squares h - 1 / (2 beta), with h not multiplied by beta: (beta h - 1/2)^2 is "
            "beta^2 times the loss.",
            lambda pc, pr, rc, rr, beta, loss_type="sigmoid": _dpo(
                pc, pr, rc, rr, beta, loss_type, ipo_target=0.5, ipo_beta=True)),
]


@learner_facing
def check_calc_dpo_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    ref_rejected_logps, beta, loss_type="sigmoid")`: the mean DPO (or IPO) loss over the pairs."""
    check_function("calc_dpo_loss", fn, reference_dpo_loss, _dpo_oracle, _dpo_cases(),
                   DPO_MISTAKES, dims="a scalar", atol=1e-4, grad_oracle=_dpo_gradient_oracle)
