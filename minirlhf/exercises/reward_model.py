"""Checks for notebook 6: the reward model's pairwise loss and the last-token index.

The oracles are written differently from the library on purpose: the loss one pair at a time in
plain Python floats (with the numerically stable form of log(1 + e^-x) spelt out), the last real
token found by walking each row of the mask from the right.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from minirlhf.exercises.core import Case, Mistake, check_function, randn
from minirlhf.exercises.reporting import learner_facing
from minirlhf.pairs.reward_model import calc_pairwise_loss, get_last_token_index

# ---------------------------------------------------------------- the pairwise loss


def _softplus_of_minus(x: float) -> float:
    """log(1 + e^-x), without overflow for large |x|."""
    return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))


def _pairwise_oracle(
    chosen_rewards: Float[Tensor, " batch"],
    rejected_rewards: Float[Tensor, " batch"],
    margin: Float[Tensor, " batch"] | None = None,
) -> Float[Tensor, ""]:
    margins = [0.0] * len(chosen_rewards) if margin is None else margin.tolist()
    losses = [_softplus_of_minus(c - r - m) for c, r, m in
              zip(chosen_rewards.tolist(), rejected_rewards.tolist(), margins)]
    return torch.tensor(sum(losses) / len(losses))


def _pairwise_gradient_oracle(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None
                              ) -> Float[Tensor, ""]:
    """The same loss in float64 tensors, for its gradient: -log σ(x) = log(e^0 + e^-x)."""
    x = chosen.double() - rejected.double() - (0.0 if margin is None else margin.double())
    return torch.logaddexp(torch.zeros_like(x), -x).mean()


def _pairwise_cases() -> list[Case]:
    margin = randn(6, seed=3).abs()
    return [
        Case("hand-worked: r_c - r_r = 0 and ln 2 (loss (ln 2 + ln 1.5) / 2)",
             {"chosen_rewards": torch.tensor([1.0, math.log(2.0)], requires_grad=True),
              "rejected_rewards": torch.tensor([1.0, 0.0], requires_grad=True)}),
        Case("6 pairs, no margin", {"chosen_rewards": randn(6, seed=0, grad=True),
                                    "rejected_rewards": randn(6, seed=1, grad=True)}),
        Case("6 pairs with a margin", {"chosen_rewards": randn(6, seed=0, grad=True),
                                       "rejected_rewards": randn(6, seed=1, grad=True),
                                       "margin": margin}),
        Case("rewards far apart (differences of +-200)",
             {"chosen_rewards": torch.tensor([200.0, -100.0], requires_grad=True),
              "rejected_rewards": torch.tensor([0.0, 100.0], requires_grad=True)},
             stability="sigmoid(-200) is 0 in float32, so log(sigmoid(x)) is -inf (and "
             "F.binary_cross_entropy clamps that log at -100, giving 100 where the loss is 200). "
             "Use F.logsigmoid(x), which never forms sigmoid(x): -F.logsigmoid(x).mean(), or "
             "F.softplus(-x).mean()."),
        Case("a batch of one", {"chosen_rewards": torch.tensor([0.3], requires_grad=True),
                                "rejected_rewards": torch.tensor([1.1], requires_grad=True)}),
    ]


# Deliberately wrong versions, so no shape annotations.
def _with_margin(chosen_rewards, rejected_rewards, margin, sign):
    difference = chosen_rewards - rejected_rewards
    return difference if margin is None else difference + sign * margin


PAIRWISE_MISTAKES = [
    Mistake("the sign is flipped: the loss is -log sigmoid(r_chosen - r_rejected), which is small "
            "when the chosen text scores higher.",
            lambda chosen_rewards, rejected_rewards, margin=None: -F.logsigmoid(
                -_with_margin(chosen_rewards, rejected_rewards, margin, -1)).mean()),
    Mistake("did you forget the minus? log sigmoid is negative; the loss is -log sigmoid(...).",
            lambda chosen_rewards, rejected_rewards, margin=None: F.logsigmoid(
                _with_margin(chosen_rewards, rejected_rewards, margin, -1)).mean()),
    Mistake("the margin is subtracted from the difference (r_c - r_r - m), not added.",
            lambda chosen_rewards, rejected_rewards, margin=None: -F.logsigmoid(
                _with_margin(chosen_rewards, rejected_rewards, margin, +1)).mean()),
    Mistake("did you ignore the margin argument?",
            lambda chosen_rewards, rejected_rewards, margin=None: -F.logsigmoid(
                chosen_rewards - rejected_rewards).mean()),
    Mistake("did you sum over the pairs? Take the mean, so the loss does not grow with the batch.",
            lambda chosen_rewards, rejected_rewards, margin=None: -F.logsigmoid(
                _with_margin(chosen_rewards, rejected_rewards, margin, -1)).sum()),
    Mistake("that is the accuracy-like sigmoid, not its log: the loss is -log sigmoid(...).",
            lambda chosen_rewards, rejected_rewards, margin=None: -torch.sigmoid(
                _with_margin(chosen_rewards, rejected_rewards, margin, -1)).mean()),
]


@learner_facing
def check_calc_pairwise_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(chosen_rewards, rejected_rewards, margin=None)`: mean -log σ(r_c - r_r - m)."""
    check_function("calc_pairwise_loss", fn, calc_pairwise_loss, _pairwise_oracle,
                   _pairwise_cases(), PAIRWISE_MISTAKES, grad_oracle=_pairwise_gradient_oracle)


# ---------------------------------------------------------------- the last real token


def _last_token_oracle(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, " batch"]:
    indices = []
    for row in attention_mask.tolist():
        position = len(row) - 1
        while row[position] == 0:
            position -= 1
        indices.append(position)
    return torch.tensor(indices)


def _mask(rows: list[str]) -> Int[Tensor, "batch seq"]:
    """A mask from strings of 0s and 1s: "1100" is a row of two real tokens, right-padded."""
    return torch.tensor([[int(c) for c in row] for row in rows])


LAST_TOKEN_CASES = [
    Case("right padding", {"attention_mask": _mask(["111100", "111111", "100000"])}),
    Case("left padding", {"attention_mask": _mask(["001111", "111111", "000001"])}),
    Case("no padding", {"attention_mask": _mask(["1111", "1111"])}),
    Case("a batch of one, one real token", {"attention_mask": _mask(["1"])}),
]

LAST_TOKEN_MISTAKES = [
    Mistake("reward read at a padding position: with right padding the last real token is at "
            "length - 1, not at the last column (-1).",
            lambda attention_mask: torch.full((attention_mask.shape[0],),
                                              attention_mask.shape[1] - 1)),
    Mistake("reward read at a padding position: `attention_mask.sum(-1) - 1` is the last real "
            "token only with right padding; with left padding it points into the padding.",
            lambda attention_mask: attention_mask.sum(-1) - 1),
    Mistake("reward read at a padding position: `attention_mask.sum(-1)` is the first padding "
            "position after the text (off by one).",
            lambda attention_mask: attention_mask.sum(-1)),
    Mistake("that is the first real token (argmax finds the first 1), not the last.",
            lambda attention_mask: attention_mask.argmax(-1)),
]


@learner_facing
def check_get_last_token_index(fn: Callable[..., Tensor]) -> None:
    """Check `fn(attention_mask)`: each row's last real token, for left and right padding."""
    check_function("get_last_token_index", fn, get_last_token_index, _last_token_oracle,
                   LAST_TOKEN_CASES, LAST_TOKEN_MISTAKES, dims="batch")
