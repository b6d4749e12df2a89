"""Checks for notebook 3's last exercise: the four terms combined, each with its sign.

The trainer maximises `clipped_surrogate - value_loss + entropy_bonus - kl_penalty`. The oracle
is a table worked by hand; the first case uses the powers of two 1, 2, 4 and 8, so that every
flipped sign and every missing term gives a different number, and the check can name it.
"""

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from minirlhf.exercises.core import Case, Mistake, check_function
from minirlhf.exercises.reporting import learner_facing

TERMS = ("clipped_surrogate", "value_loss", "entropy_bonus", "kl_penalty")
SIGNS = (+1.0, -1.0, +1.0, -1.0)

# (clipped_surrogate, value_loss, entropy_bonus, kl_penalty) -> the objective, worked by hand.
OBJECTIVE_TABLE = {
    (1.0, 2.0, 4.0, 8.0): -5.0,  # 1 - 2 + 4 - 8
    (0.25, 0.5, 0.125, 0.0625): -0.1875,  # 0.25 - 0.5 + 0.125 - 0.0625
    (-0.5, 0.0, 0.0, 0.75): -1.25,  # a negative surrogate, no value loss or entropy
}


def _objective_cases() -> list[Case]:
    return [Case(f"clipped_surrogate={s}, value_loss={v}, entropy_bonus={e}, kl_penalty={k}",
                 {name: torch.tensor(x, requires_grad=True)
                  for name, x in zip(TERMS, (s, v, e, k), strict=True)})
            for (s, v, e, k) in OBJECTIVE_TABLE]


def _table_oracle(clipped_surrogate: Float[Tensor, ""], value_loss: Float[Tensor, ""],
                  entropy_bonus: Float[Tensor, ""], kl_penalty: Float[Tensor, ""]
                  ) -> Float[Tensor, ""]:
    key = tuple(t.item() for t in (clipped_surrogate, value_loss, entropy_bonus, kl_penalty))
    return torch.tensor(OBJECTIVE_TABLE[key])


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
]


calc_rlhf_objective = _weighted(SIGNS)
"""The reference: what `RLHFTrainer.compute_rlhf_objective` adds up from the four terms."""


@learner_facing
def check_calc_rlhf_objective(fn: Callable[..., Tensor]) -> None:
    """Check `fn(clipped_surrogate, value_loss, entropy_bonus, kl_penalty)`: the objective the
    trainer maximises, with its gradient kept."""
    check_function("calc_rlhf_objective", fn, calc_rlhf_objective, _table_oracle,
                   _objective_cases(), OBJECTIVE_MISTAKES, dims="a scalar")
