"""The pure helpers of the reward-vs-KL frontier benchmark (benchmarks/frontier.py and
frontier_report.py), against numbers worked by hand, and the route by which TRL's trained policy
comes back to minirlhf (trl_peer_trl.save_policy). The benchmark itself is not run here."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.runtime.export import export_hf
from minirlhf.runtime.loading import load_policy, load_tiny_model
from minirlhf.shaping import penalize_repetition

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # frontier.py imports its neighbours by name
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


report = load_script("frontier_report")
frontier = load_script("frontier")
trl_side = load_script("trl_peer_trl")

# ---- the upper envelope ----

POINTS = [(0.5, 0.3), (0.2, 0.4), (1.0, 0.6), (0.8, 0.1), (0.0, 0.1), (0.2, 0.35)]
# By hand, in KL order: (0.0, 0.1) starts; (0.2, 0.4) beats it (and (0.2, 0.35) at the same KL
# does not); (0.5, 0.3) and (0.8, 0.1) are beaten by (0.2, 0.4) at a smaller KL; (1.0, 0.6) beats
# everything before it.
ENVELOPE = [(0.0, 0.1), (0.2, 0.4), (1.0, 0.6)]


def every_point_by_kl(points):
    """The mistake the check must catch: the curve through every point, sorted by KL."""
    return sorted(points)


@pytest.mark.parametrize("envelope, right", [(report.get_envelope, True),
                                             (every_point_by_kl, False)])
def test_envelope_keeps_only_points_nothing_beats(envelope, right):
    assert (envelope(POINTS) == ENVELOPE) is right


def test_envelope_of_one_point_is_that_point():
    assert report.get_envelope([(0.3, -0.2)]) == [(0.3, -0.2)]


# ---- the envelope's reward at a KL ----

FRONT = [(0.0, 0.1), (1.0, 0.5), (3.0, 0.9)]


@pytest.mark.parametrize("kl, expected", [
    (0.0, 0.1), (0.5, 0.3), (1.0, 0.5), (2.0, 0.7), (3.0, 0.9),  # 0.5 + 0.4 * (2 - 1) / 2
    (3.5, None), (-0.1, None),
])
def test_reward_at_kl_is_linear_between_envelope_points(kl, expected):
    got = report.reward_at_kl(FRONT, kl)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_reward_at_kl_of_a_single_point():
    assert report.reward_at_kl([(0.0, 0.2)], 0.0) == 0.2
    assert report.reward_at_kl([(0.0, 0.2)], 0.1) is None
    assert report.reward_at_kl([], 0.0) is None


def test_envelope_is_carried_flat_to_the_largest_measured_kl():
    # TRL's points (0, 0.2) [the base model] and (0.15, 0.1): the envelope is the base point
    # alone, and a point at KL 0.1 is compared with 0.2, not called out of range.
    front = report.extend_flat(report.get_envelope([(0.0, 0.2), (0.15, 0.1)]), 0.15)
    assert front == [(0.0, 0.2), (0.15, 0.2)]
    assert report.reward_at_kl(front, 0.1) == pytest.approx(0.2)
    assert report.extend_flat(FRONT, 2.0) == FRONT


def test_vs_trl_is_the_gap_to_trl_at_the_same_measured_kl():
    point = {"method": "grpo", "kl": 2.0, "reward": 0.6}
    assert report.vs_trl(point, FRONT) == "-0.100"  # TRL's envelope is at 0.7 there
    assert report.vs_trl({**point, "kl": 4.0}, FRONT) == "beyond TRL's KL range"
    assert report.vs_trl({**point, "method": "trl_grpo"}, FRONT) == ""


# ---- the best point: the highest reward among the fluent ones ----

HACKED = {"name": "hacked", "reward": 0.9, "repeated_3gram": 0.30}
FLUENT = {"name": "fluent", "reward": 0.7, "repeated_3gram": 0.08}
TAME = {"name": "tame", "reward": 0.5, "repeated_3gram": 0.0}


def best_by_reward_alone(points, base_repeat, slack=0.1):
    """The mistake the check must catch: the highest reward, however repetitive."""
    return {**max(points, key=lambda p: p["reward"]), "fluent": True}


@pytest.mark.parametrize("pick, right", [(report.pick_best, True),
                                         (best_by_reward_alone, False)])
def test_best_point_is_the_highest_reward_within_the_repetition_bar(pick, right):
    # Base model repeats 0.02; the bar is 0.02 + 0.10 = 0.12: FLUENT (0.08) passes, HACKED
    # (0.30) does not, and FLUENT's reward beats TAME's.
    best = pick([HACKED, FLUENT, TAME], base_repeat=0.02)
    assert (best["name"] == "fluent" and best["fluent"]) is right


def test_best_point_when_none_is_fluent_is_the_highest_reward_flagged():
    best = report.pick_best([HACKED, {**FLUENT, "repeated_3gram": 0.2}], base_repeat=0.0)
    assert best["name"] == "hacked" and best["fluent"] is False


def test_best_point_treats_an_unmeasured_repetition_as_not_fluent():
    best = report.pick_best([{**HACKED, "repeated_3gram": math.nan}, TAME], base_repeat=0.0)
    assert best["name"] == "tame"


def test_best_point_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one point"):
        report.pick_best([], base_repeat=0.0)


# ---- curves and file names ----


def make_point(method, kl, phases=25, direction="pos", kind="kl_coef"):
    return {"method": method, "kl": kl, "phases": phases, "direction": direction, "kind": kind}


def test_each_curve_starts_at_the_base_point_and_runs_by_kl():
    base = make_point("base", 0.0, phases=0)
    points = [make_point("grpo", 2.0), base, make_point("grpo", 1.0), make_point("rloo", 0.5),
              make_point("grpo", 9.0, direction="neg")]
    curves = report.get_curves(points, "pos")
    assert list(curves) == ["GRPO", "RLOO"]
    assert [p["kl"] for p in curves["GRPO"]] == [0.0, 1.0, 2.0]
    assert [p["method"] for p in curves["RLOO"]] == ["base", "rloo"]


def test_curves_of_different_phase_counts_are_kept_apart():
    points = [make_point("grpo", 1.0, phases=25), make_point("grpo", 2.0, phases=40)]
    assert sorted(report.get_curves(points, "pos")) == ["GRPO, 25 phases", "GRPO, 40 phases"]


def test_point_names():
    assert frontier.point_name("grpo", "neg", "kl_coef", 0.05, 25) == \
        "frontier-grpo-neg-kl0.05-p25"
    assert frontier.point_name("ppo_gae", "pos", "kl_target", 6.0, 10) == \
        "frontier-ppo_gae-pos-kltarget6-p10"
    assert frontier.point_name("dpo", "pos", "beta", 0.1, 25) == "frontier-dpo-pos-beta0.1"


# ---- TRL's trained policy back in minirlhf ----


@torch.no_grad()
def get_logprobs(model, text: str) -> torch.Tensor:
    tokens = model.to_tokens(text)
    return model(tokens).log_softmax(-1)[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0]


class PeftLike:
    """Stands for a PEFT model: it cannot be saved as it is, only after merge_and_unload."""

    def __init__(self, model):
        self.model = model

    def merge_and_unload(self):
        return self.model


@pytest.mark.parametrize("wrap", [False, True])
def test_saved_policy_loads_in_minirlhf_with_the_same_logprobs(tmp_path, wrap):
    from transformers import AutoModelForCausalLM

    tiny = load_tiny_model(seed=3)
    export_hf(tiny, tmp_path / "start", prepend_bos=True)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "start", dtype=torch.float32)
    trl_side.save_policy(PeftLike(hf_model) if wrap else hf_model, str(tmp_path / "start"),
                         str(tmp_path / "saved"))
    loaded = load_policy(str(tmp_path / "saved"))
    assert loaded.cfg.default_prepend_bos
    text = "The film was a quiet triumph."
    torch.testing.assert_close(get_logprobs(loaded, text), get_logprobs(tiny, text),
                               atol=1e-5, rtol=0)


# ---- the preset sweep (benchmarks/neg_sweep.py) ----

sweep = load_script("neg_sweep")


def test_the_sweep_shapes_its_rep_settings_with_the_library():
    """`rep*` settings train on `shaping.penalize_repetition` (tested in tests/test_shaping.py)."""
    assert sweep.penalize_repetition is penalize_repetition
    assert all(sweep.SETTINGS[name]["repeat_penalty"] > 0 for name in sweep.SETTINGS
               if "rep" in name)


@pytest.mark.parametrize("vader, repeat, direction, expected", [
    (-0.85, 0.15, "neg", (True, True)),    # past -0.8; 0.15 <= 0.07 + 0.10
    (-0.75, 0.05, "neg", (False, True)),   # not past -0.8
    (-0.95, 0.20, "neg", (True, False)),   # 0.20 > 0.17: repeats too much
    (0.92, 0.0, "pos", (True, True)),
    (-0.92, 0.0, "pos", (False, True)),    # a negative VADER does not reach the positive target
])
def test_setting_verdicts(vader, repeat, direction, expected):
    assert sweep.judge_setting(vader, repeat, base_repeat=0.07, direction=direction) == expected
