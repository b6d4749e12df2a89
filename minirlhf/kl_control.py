"""The KL coefficient: fixed, or adapted to hold the KL near a target.

Between the reward and the optimiser: the trainer reads `controller.value` as the coefficient of
the KL penalty for a phase, then calls `controller.update(kl, n_steps)` with the KL it measured.
Adaptive control follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences", section 2.2):

    e = clip(KL / target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)

The clip bounds how fast beta moves when the KL is far from its target (a KL ten times the target
grows beta as much as one 1.2 times it). Both controllers save and restore their state, so a
resumed run continues with the coefficient it had.
"""

from typing import NamedTuple

ERROR_CLIP = 0.2
"""Ziegler et al.'s bound on the proportional error."""


class FixedKLController:
    """A constant coefficient (`RLHFArgs.kl_target` None)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int):
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. 2019's proportional controller of the KL coefficient.

    Args:
        init_kl_coef: the coefficient to start from.
        target: the KL to hold (in the units `update` is given).
        horizon: samples over which a constant error of e changes the coefficient by about e.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl: float, n_steps: int):
        """Move the coefficient after `n_steps` samples (a phase's batch) that had this KL."""
        error = min(max(kl / self.target - 1, -ERROR_CLIP), ERROR_CLIP)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = state["value"]


def get_kl_controller(
    kl_coef: float, kl_target: float | None, kl_horizon: int
) -> FixedKLController | AdaptiveKLController:
    """The adaptive controller when a target is set, else a fixed coefficient."""
    if kl_target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, kl_target, kl_horizon)


class KLCoefs(NamedTuple):
    """The KL coefficient where it applies: in the objective, or in the per-token reward."""

    loss: float
    reward: float


def get_kl_coefs(kl_coef: float, kl_in: str) -> KLCoefs:
    """`kl_coef` where `RLHFArgs.kl_in` puts the KL penalty ("loss" or "reward"), 0 elsewhere."""
    return KLCoefs(kl_coef, 0.0) if kl_in == "loss" else KLCoefs(0.0, kl_coef)
