"""Tests for minirlhf.kl_control against numbers worked by hand (Ziegler et al. 2019's rule), and
the same check shown failing on a controller whose error is not clipped."""

import pytest

from minirlhf.kl_control import AdaptiveKLController, FixedKLController, get_kl_controller

# (kl, n_steps) per update, and the coefficient after each, from init 0.2, target 6, horizon 1000.
# 1. kl 9:  e = 9/6 - 1 = 0.5, clipped to 0.2;   0.2 * (1 + 0.2 * 100/1000)  = 0.204
# 2. kl 6:  e = 0;                                0.204
# 3. kl 4.5: e = 4.5/6 - 1 = -0.25, clipped -0.2; 0.204 * (1 - 0.2 * 100/1000) = 0.19992
# 4. kl 6.6: e = 0.1 (inside the clip);          0.19992 * (1 + 0.1 * 50/1000) = 0.2009196
HAND_WORKED = [((9.0, 100), 0.204), ((6.0, 100), 0.204), ((4.5, 100), 0.19992),
               ((6.6, 50), 0.2009196)]


def controller_problem(controller) -> str | None:
    """None if the controller follows the hand-worked sequence, else the first difference."""
    for (kl, n_steps), expected in HAND_WORKED:
        controller.update(kl, n_steps)
        if controller.value != pytest.approx(expected, rel=1e-9):
            return f"after kl={kl}, n_steps={n_steps}: {controller.value}, expected {expected}"
    return None


class UnclippedController(AdaptiveKLController):
    """The classic mistake: the proportional error used as it is, so one far-off KL jumps beta."""

    def update(self, kl: float, n_steps: int):
        self.value *= 1 + (kl / self.target - 1) * n_steps / self.horizon


def test_adaptive_controller_matches_hand_worked_numbers():
    problem = controller_problem(AdaptiveKLController(0.2, target=6.0, horizon=1000))
    assert problem is None, problem


def test_the_check_rejects_an_unclipped_error():
    assert controller_problem(UnclippedController(0.2, target=6.0, horizon=1000)) is not None


def test_fixed_controller_never_moves():
    controller = FixedKLController(2.5)
    controller.update(100.0, 1000)
    assert controller.value == 2.5


def test_state_round_trips():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    controller.update(9.0, 100)
    restored = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value == pytest.approx(0.204)


def test_get_kl_controller_picks_by_target():
    assert isinstance(get_kl_controller(1.0, None, 10), FixedKLController)
    adaptive = get_kl_controller(1.0, 3.0, 10)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (1.0, 3.0, 10)
