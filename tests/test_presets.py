"""Tests for minirlhf.cli.presets: every preset is a valid config, and the offline default is
pinned."""

import pytest

from minirlhf.args import RLHFArgs
from minirlhf.cli.presets import DEFAULT_PRESET, PRESETS

REWARD_KINDS = {"vader", "control", "classifier", "char_count", "reward_model", "task"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_builds_valid_args(name):
    preset = PRESETS[name]
    args = RLHFArgs(**preset["args"])  # raises ValueError on a bad value, TypeError on a bad name
    assert args.batch_size % args.num_minibatches == 0
    assert preset["reward"]["kind"] in REWARD_KINDS


def test_the_offline_preset_is_what_it_was():
    """The values `smollm2-vader` listed before the presets shared a base (written out by hand),
    so a change to the base or to an RLHFArgs default cannot move the README's run silently."""
    expected = dict(
        base_model="smollm2", prefix="This movie was", total_phases=25, batch_size=32,
        num_minibatches=4, batches_per_learning_phase=2, gen_len=20, base_lr=1e-3,
        head_lr=5e-4, warmup_steps=2, final_scale=0.8, kl_coef=0.05, vf_coef=0.15,
        ent_coef=0.001, advantage_estimator="gae", gamma=1.0, gae_lambda=1.0,
        temperature=1.0, top_k=None, prepend_bos=True, precision="auto",
        trainable_layers=8, lora_rank=16, lora_alpha=32.0,
    )
    assert DEFAULT_PRESET == "smollm2-vader"
    args = RLHFArgs(**PRESETS["smollm2-vader"]["args"])
    differing = {k: (getattr(args, k), v) for k, v in expected.items() if getattr(args, k) != v}
    assert not differing, f"(now, was): {differing}"
    assert args == RLHFArgs(**expected)
    assert PRESETS["smollm2-vader"]["reward"] == {"kind": "vader", "direction": "pos"}
