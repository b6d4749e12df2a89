"""Checks for notebook 10: answers that end (the response mask, the masked mean, GAE over ragged
answers, the three aggregations and the weight each gives a token).

The oracles read each answer's length from a list and loop over one answer at a time in Python
floats; the gradients are checked against the per-token weights written as formulas
(docs/answers.md), not against autograd of the library. Every case holds a long answer and a short
one, and padding that is either 0 (where only the gradient can tell padding was counted) or far
from the real values (where the value tells it).
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from minirlhf.advantages import compute_gae
from minirlhf.exercises.core import (
    Case,
    Mistake,
    agree,
    check_function,
    describe_difference,
    hint_from_every_case,
    passed,
    randn,
)
from minirlhf.exercises.reporting import call, clone_inputs, describe_error, fail, learner_facing
from minirlhf.losses import aggregate

Mask = Int[Tensor, "batch gen_len"]
PerToken = Float[Tensor, "batch gen_len"]


def _mask(lengths: list[int], gen_len: int) -> Mask:
    return torch.tensor([[int(t < n) for t in range(gen_len)] for n in lengths])


def _lengths(response_mask: Mask) -> list[int]:
    """Each answer's length, read as the position after its last 1 (not by summing)."""
    return [max((t + 1 for t, m in enumerate(row) if m), default=0)
            for row in response_mask.tolist()]


# ---------------------------------------------------------------- the response mask

EOS = 9


def reference_get_response_mask(gen_tokens: Int[Tensor, "batch gen_len"], eos_id: int) -> Mask:
    """1 for each answer's tokens up to and including its first EOS, 0 after (all 1 without)."""
    is_eos = gen_tokens == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), gen_tokens.shape[1])
    positions = torch.arange(gen_tokens.shape[1])
    return (positions[None, :] <= first[:, None]).long()


def _mask_oracle(gen_tokens: Int[Tensor, "batch gen_len"], eos_id: int) -> Mask:
    rows = []
    for row in gen_tokens.tolist():
        out, ended = [], False
        for token in row:
            out.append(0 if ended else 1)
            ended = ended or token == eos_id
        rows.append(out)
    return torch.tensor(rows)


def _mask_cases() -> list[Case]:
    tokens = torch.tensor([[3, 4, EOS, 5, 6], [EOS, 2, 2, EOS, 1], [1, 2, 3, 4, 5]])
    forced = torch.tensor([[7, EOS, EOS, EOS], [7, 7, 7, EOS]])  # the sampler's padding is EOS
    return [Case("an answer that ends mid-way (tokens after its EOS), one that is its EOS alone, "
                 "one that never ends", {"gen_tokens": tokens, "eos_id": EOS}),
            Case("the sampler's rows: EOS repeated after the end, an EOS in the last place",
                 {"gen_tokens": forced, "eos_id": EOS})]


MASK_MISTAKES = [
    Mistake("the EOS is left out of the mask: the answer's last real token is its EOS (the model "
            "chose to stop there, and that choice must be trained), so mark positions up to and "
            "including the first EOS.",
            lambda gen_tokens, eos_id: ((gen_tokens == eos_id).long().cumsum(1) == 0).long()),
    Mistake("only the EOS tokens are masked out: the tokens after an answer's first EOS are "
            "padding too, whatever they are. Find the first EOS (a cumulative sum of "
            "`gen_tokens == eos_id` that is still 0 one step before).",
            lambda gen_tokens, eos_id: (gen_tokens != eos_id).long()),
]


@learner_facing
def check_get_response_mask(fn: Callable[..., Tensor]) -> None:
    """Check `fn(gen_tokens, eos_id)`: 1 up to and including each row's first EOS, then 0."""
    check_function("get_response_mask", fn, reference_get_response_mask, _mask_oracle,
                   _mask_cases(), MASK_MISTAKES, dims="batch, gen_len")


# ---------------------------------------------------------------- GAE over answers that end


def reference_compute_gae_with_ends(values: PerToken, rewards: Float[Tensor, " batch"],
                                    response_mask: Mask, gamma: float = 1.0,
                                    gae_lambda: float = 0.95) -> PerToken:
    """The library's GAE, with V(s_t) given per generated token (a one-token prompt)."""
    return compute_gae(F.pad(values, (0, 1)), rewards, 1, gamma, gae_lambda, response_mask)


def _gae_oracle(values: PerToken, rewards: Float[Tensor, " batch"], response_mask: Mask,
                gamma: float = 1.0, gae_lambda: float = 0.95) -> PerToken:
    rows = []
    for v, r, n in zip(values.tolist(), rewards.tolist(), _lengths(response_mask)):
        row, running = [0.0] * len(v), 0.0
        for t in reversed(range(n)):  # the answer's own last token first; padding stays 0
            last = t == n - 1
            delta = (r if last else gamma * v[t + 1]) - v[t]
            running = delta + gamma * gae_lambda * running
            row[t] = running
        rows.append(row)
    return torch.tensor(rows)


def _gae_cases() -> list[Case]:
    mask = _mask([6, 2, 4, 1], 6)
    return [Case("answers of 6, 2, 4 and 1 tokens, gamma 1, lambda 0.95",
                 {"values": randn(4, 6, seed=3), "rewards": randn(4, seed=4),
                  "response_mask": mask, "gamma": 1.0, "gae_lambda": 0.95}),
            Case("the same lengths, gamma 0.9, lambda 0.5",
                 {"values": randn(4, 6, seed=5), "rewards": randn(4, seed=6),
                  "response_mask": mask, "gamma": 0.9, "gae_lambda": 0.5})]


def _gae(values, rewards, response_mask, gamma=1.0, gae_lambda=0.95, *, ends=None, alive=None,
         bootstrap=False):
    """GAE with one thing changed: where the reward sits, what counts as alive, or a value read
    after the end."""
    mask = response_mask.float()
    alive = mask if alive is None else alive
    ends = F.one_hot(mask.sum(1).long() - 1, mask.shape[1]).float() if ends is None else ends
    next_values = F.pad(values[:, 1:], (0, 1))
    next_alive = next_values * (1.0 if bootstrap else F.pad(mask[:, 1:], (0, 1)))
    deltas = (rewards[:, None] * ends + gamma * next_alive - values) * alive
    advantages, running = torch.zeros_like(values), torch.zeros_like(rewards)
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * gae_lambda * running
        advantages[:, t] = running
    return advantages * mask


def _at_the_limit(values, rewards, response_mask, gamma=1.0, gae_lambda=0.95):
    """Fixed-length GAE (the reward at gen_len - 1, values read through the padding), with the
    padding's advantages zeroed afterwards."""
    return compute_gae(F.pad(values, (0, 1)), rewards, 1, gamma, gae_lambda) * response_mask


GAE_MISTAKES = [
    Mistake("the reward sits at gen_len - 1 instead of the answer's last real token: an answer "
            "that ended at token L gets its reward at position L - 1 (ends = one_hot(lengths - "
            "1)), and nothing after it.", _at_the_limit),
    Mistake("the EOS is left out of the mask: the reward belongs to each answer's last real "
            "token, its EOS, one position later than where you put it.",
            lambda values, rewards, response_mask, gamma=1.0, gae_lambda=0.95: _gae(
                values, rewards, response_mask, gamma, gae_lambda,
                ends=F.one_hot((response_mask.sum(1) - 2).clamp(min=0), values.shape[1]).float())),
    Mistake("the value after an answer's last token is read: the episode is over there, so no "
            "V(s_{t+1}) follows the reward (multiply next values by the next position's mask).",
            lambda values, rewards, response_mask, gamma=1.0, gae_lambda=0.95: _gae(
                values, rewards, response_mask, gamma, gae_lambda, bootstrap=True)),
    Mistake("the padding's deltas flow back into the answer: zero every delta after an answer's "
            "end before the backward sum (padding is counted otherwise).",
            lambda values, rewards, response_mask, gamma=1.0, gae_lambda=0.95: _gae(
                values, rewards, response_mask, gamma, gae_lambda,
                alive=torch.ones_like(values))),
]


@learner_facing
def check_compute_gae_with_ends(fn: Callable[..., Tensor]) -> None:
    """Check `fn(values, rewards, response_mask, gamma, gae_lambda)`: GAE where each answer ends
    at its own last real token, 0 on the padding."""
    check_function("compute_gae_with_ends", fn, reference_compute_gae_with_ends, _gae_oracle,
                   _gae_cases(), GAE_MISTAKES, dims="batch, gen_len")


# ---------------------------------------------------------------- weights and the aggregations


def _weights_oracle(response_mask: Mask, how: str) -> PerToken:
    """d(loss)/d(token) by the formulas: 1 / N_total, 1 / (B L_i) or 1 / (B gen_len)."""
    lengths, gen_len = _lengths(response_mask), response_mask.shape[1]
    batch, total = len(lengths), sum(lengths)
    weight = {"token_mean": lambda n: 1 / total, "sequence_mean": lambda n: 1 / (batch * n),
              "constant": lambda n: 1 / (batch * gen_len)}[how]
    return torch.tensor([[weight(n) if t < n else 0.0 for t in range(gen_len)] for n in lengths])


def _aggregate_oracle(values: PerToken, response_mask: Mask, how: str = "token_mean"
                      ) -> Float[Tensor, ""]:
    lengths, gen_len = _lengths(response_mask), response_mask.shape[1]
    sums = [sum(row[:n]) for row, n in zip(values.tolist(), lengths)]
    if how == "token_mean":
        result = sum(sums) / sum(lengths)
    elif how == "sequence_mean":
        result = sum(s / n for s, n in zip(sums, lengths)) / len(lengths)
    else:
        result = sum(sums) / (len(lengths) * gen_len)
    return torch.tensor(result)


def reference_get_token_weights(response_mask: Mask, how: str) -> PerToken:
    """The weight `aggregate` gives each token: its gradient with respect to that token."""
    values = torch.zeros(response_mask.shape, requires_grad=True)
    return torch.autograd.grad(aggregate(values, response_mask, how), values)[0]


def _values_cases(with_how: bool) -> list[Case]:
    """A long and a short answer: padding 0 (the value cannot see it counted, the gradient can),
    then padding far from the real values, then three answers of 6, 1 and 3 tokens."""
    quiet = randn(2, 6, seed=0) * _mask([6, 2], 6)
    loud = randn(2, 6, seed=1) + 10.0 * (1 - _mask([5, 2], 6))
    cases = [("a long and a short answer, padding 0.0", quiet, _mask([6, 2], 6)),
             ("padding far from the real values", loud, _mask([5, 2], 6)),
             ("three answers of 6, 1 and 3 tokens", randn(3, 6, seed=2), _mask([6, 1, 3], 6))]
    hows = ["token_mean", "sequence_mean", "constant"] if with_how else ["token_mean"]
    return [Case(f"{name}{f', how={how!r}' if with_how else ''}",
                 {"values": values.requires_grad_(True), "response_mask": mask,
                  **({"how": how} if with_how else {})})
            for how in hows for name, values, mask in cases]


def _weights_cases() -> list[Case]:
    return [Case(f"answers of {lengths} tokens (gen_len {gen_len}), how={how!r}",
                 {"response_mask": _mask(lengths, gen_len), "how": how})
            for how in ("token_mean", "sequence_mean", "constant")
            for lengths, gen_len in (([8, 2], 8), ([3, 3, 1], 4))]


# Deliberately wrong versions (no shape annotations).
def _padded_mean(values, response_mask, how="token_mean"):
    return values.mean()


def _sequence_mean(values, response_mask, how="token_mean"):
    mask = response_mask.float()
    return ((values * mask).sum(1) / mask.sum(1)).mean()


def _padding_in_numerator(values, response_mask, how="token_mean"):
    return values.sum() / response_mask.sum()


def _eos_dropped(values, response_mask, how="token_mean"):
    mask = response_mask.float()
    mask = mask - F.one_hot(mask.sum(1).long() - 1, mask.shape[1]).float()
    return (values * mask).sum() / mask.sum()


PADDING_HINT = ("padding is counted: the positions after an answer's end are not tokens of it. "
                "Sum over the real tokens only (where response_mask is 1) and divide by their "
                "number.")
PER_SEQUENCE_HINT = ("a per-sequence mean is not the token-level mean: averaging each answer "
                     "first gives a token of a short answer more weight. Sum every real token of "
                     "the batch, then divide by the number of real tokens of the batch.")
NUMERATOR_HINT = ("the padding is in the sum, though not in the count: with padding 0 the value "
                  "looks right, but padding gets a gradient. Select the real tokens "
                  "(torch.where(mask, values, 0.0), or values * mask) before summing.")
EOS_HINT = ("the EOS is left out of the mask: each answer's last real token (its EOS) must "
            "count like any other.")

MASKED_MEAN_MISTAKES = [Mistake(PADDING_HINT, _padded_mean),
                        Mistake(PADDING_HINT, lambda v, m: (v * m).sum() / v.numel()),
                        Mistake(PER_SEQUENCE_HINT, _sequence_mean),
                        Mistake(EOS_HINT, _eos_dropped),
                        Mistake(NUMERATOR_HINT, _padding_in_numerator)]


def _as(how_wrong: Callable, when: str, right: Callable = aggregate) -> Callable:
    """A wrong aggregation for `how == when`, the right one otherwise."""
    def imitate(values, response_mask, how="token_mean"):
        return (how_wrong if how == when else right)(values, response_mask, how)
    return imitate


AGGREGATE_MISTAKES = [
    Mistake(PADDING_HINT, _as(_padded_mean, "token_mean")),
    Mistake(PER_SEQUENCE_HINT, _as(_sequence_mean, "token_mean")),
    Mistake("sequence_mean divides each answer's sum by gen_len, not by its own length: that "
            "is the constant aggregation (Dr. GRPO), not GRPO's per-answer mean.",
            _as(lambda v, m, how: aggregate(v, m, "constant"), "sequence_mean")),
    Mistake("the constant aggregation divides by batch x gen_len, a number fixed before "
            "sampling, not by the number of real tokens (that is token_mean).",
            _as(lambda v, m, how: aggregate(v, m, "token_mean"), "constant")),
]


def _grad_or_none(result: Tensor, values: Tensor) -> Tensor | None:
    if not (isinstance(result, Tensor) and result.requires_grad and result.dim() == 0):
        return None
    return torch.autograd.grad(result, values, allow_unused=True)[0]


def _gradient_mistake(mistakes: list[Mistake], kwargs: dict, grad: Tensor) -> str | None:
    """The hint of the first mistake whose gradient is the learner's."""
    for mistake in mistakes:
        inputs = clone_inputs(kwargs)
        result, error = call(mistake.imitate, inputs, positional=True)
        theirs = None if error else _grad_or_none(result, inputs["values"])
        if theirs is not None and describe_difference(theirs, grad) is None:
            return mistake.hint
    return None


def check_with_gradient(exercise: str, fn: Callable, reference: Callable, cases: list[Case],
                        mistakes: list[Mistake]) -> None:
    """The value against `_aggregate_oracle`, and the gradient with respect to `values` against
    the weights of `_weights_oracle`, on every case."""
    __tracebackhide__ = True
    for case in cases:
        how = case.kwargs.get("how", "token_mean")
        expected = _aggregate_oracle(case.kwargs["values"].detach(), case.kwargs["response_mask"],
                                     how)
        expected_grad = _weights_oracle(case.kwargs["response_mask"], how)
        ref_inputs = clone_inputs(case.kwargs)
        ref = reference(*ref_inputs.values())
        agree(exercise, case.name, ref.detach(), expected)
        agree(exercise, f"{case.name} (gradient)", _grad_or_none(ref, ref_inputs["values"]),
              expected_grad)
        inputs = clone_inputs(case.kwargs)
        got, error = call(fn, inputs, positional=True)
        report = functools.partial(fail, exercise, case.name, inputs=case.kwargs,
                                   expected=expected, got=got, error=error)
        if error is not None:
            report(describe_error(error), hint_from_every_case(mistakes, cases, case, fn))
        problem = describe_difference(expected, got)
        if problem is not None:
            report(problem, hint_from_every_case(mistakes, cases, case, fn))
        grad = _grad_or_none(got, inputs["values"])
        if grad is None:
            report("Your result has no gradient with respect to `values` (or is not one number): "
                   "did you use .item(), .detach() or torch.tensor(...)?")
        problem = describe_difference(expected_grad, grad, dims="batch, gen_len")
        if problem is not None:
            leak = bool((grad[case.kwargs["response_mask"] == 0] != 0).any())
            report(f"The value is right, but the gradient on `values` is not. {problem}",
                   _gradient_mistake(mistakes, case.kwargs, grad) or (NUMERATOR_HINT if leak
                                                                       else None))
    passed(exercise, f"the value and the gradient of {len(cases)} cases match independent "
                     "oracles (a naive sum per answer; the per-token weights as formulas)")


def reference_masked_mean(values: PerToken, response_mask: Mask) -> Float[Tensor, ""]:
    return aggregate(values, response_mask, "token_mean")


@learner_facing
def check_masked_mean(fn: Callable[..., Tensor]) -> None:
    """Check `fn(values, response_mask)`: the mean over the real tokens of the batch (token
    mean), value and gradient."""
    check_with_gradient("masked_mean", fn, reference_masked_mean, _values_cases(False),
                        MASKED_MEAN_MISTAKES)


@learner_facing
def check_aggregate(fn: Callable[..., Tensor]) -> None:
    """Check `fn(values, response_mask, how)` for how in token_mean, sequence_mean, constant:
    value and gradient."""
    check_with_gradient("aggregate", fn, aggregate, _values_cases(True), AGGREGATE_MISTAKES)


def _weights_everywhere(response_mask, how):
    """Each answer's weight on every position of its row, padding included."""
    weights = _weights_oracle(response_mask, how)
    return weights[:, :1].expand_as(weights).clone()


WEIGHT_MISTAKES = [
    Mistake("padding gets a weight: a position after an answer's end must get 0 under every "
            "aggregation.", _weights_everywhere),
    Mistake("under sequence_mean each answer is first averaged over its own L_i tokens, then the "
            "B answers are averaged: 1 / (B L_i), not 1 / L_i.",
            lambda response_mask, how: _weights_oracle(response_mask, how)
            * (len(response_mask) if how == "sequence_mean" else 1)),
    Mistake(PER_SEQUENCE_HINT,
            lambda response_mask, how: _weights_oracle(
                response_mask, "sequence_mean" if how == "token_mean" else how)),
]


@learner_facing
def check_get_token_weights(fn: Callable[..., Tensor]) -> None:
    """Check `fn(response_mask, how)`: the gradient each aggregation gives every token."""
    check_function("get_token_weights", fn, reference_get_token_weights, _weights_oracle,
                   _weights_cases(), WEIGHT_MISTAKES, dims="batch, gen_len")


REFERENCES = {"get_response_mask": reference_get_response_mask,
              "masked_mean": reference_masked_mean,
              "compute_gae_with_ends": reference_compute_gae_with_ends,
              "get_token_weights": reference_get_token_weights}
"""The library's solutions of the exercises it has no function of the same name for."""
