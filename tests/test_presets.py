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


def make_train_run(*flags):
    from minirlhf import cli
    from minirlhf.cli import train as train_cli

    parser = cli.build_parser()
    return train_cli.make_run(parser.parse_args(["train", *flags]), parser)


def test_a_presets_own_direction_is_tuned_without_the_flag(monkeypatch):
    """A preset tuned for its own direction applies that tuning to `minirlhf train` as to
    `minirlhf train --direction pos`: leaving out a flag that names the default changes
    nothing."""
    tuned = {**PRESETS["smollm2-vader"], "by_direction": {"pos": {"args": {"kl_coef": 0.01}}}}
    monkeypatch.setitem(PRESETS, "smollm2-vader", tuned)
    for run in [make_train_run(), make_train_run("--direction", "pos")]:
        assert run["args"]["kl_coef"] == 0.01


def test_the_negative_direction_takes_the_presets_tuned_reward():
    """`train --direction neg` on the offline preset: LR 2e-3, KL coefficient 0.01 and its
    reward minus twice the answer's repeated 3-grams (benchmarks/neg_sweep.py's
    lr2e-3-kl0.01-rep2); flags still win, and pos is the preset as it was."""
    neg = make_train_run("--direction", "neg")
    assert neg["reward"] == {"kind": "vader", "direction": "neg", "repeat_penalty": 2.0}
    preset = RLHFArgs(**PRESETS["smollm2-vader"]["args"]).to_dict()
    assert neg["args"] == preset | {"base_lr": 2e-3, "kl_coef": 0.01}
    pos = make_train_run()
    assert pos["reward"] == {"kind": "vader", "direction": "pos"} and pos["args"] == preset
    flagged = make_train_run("--direction", "neg", "--base-lr", "3e-4")
    assert flagged["args"]["base_lr"] == 3e-4 and flagged["args"]["kl_coef"] == 0.01


def test_a_repeat_penalty_in_a_reward_spec_takes_the_repeats_off():
    """The spec's penalty by hand: "bad bad bad bad bad" repeats 2 of its 3 3-grams."""
    from minirlhf.cli.presets import make_reward_fn
    from minirlhf.rewards import get_rewards
    from minirlhf.sentiment import make_vader_reward

    texts = ["It was bad bad bad bad bad", "It was a dull film"]
    plain = get_rewards(make_vader_reward("neg"), texts)
    shaped = get_rewards(make_reward_fn({"kind": "vader", "direction": "neg",
                                         "repeat_penalty": 1.5}), texts)
    # "it was bad bad bad bad bad": 5 3-grams, "bad bad bad" 3 times, 2 of them repeats.
    assert shaped.tolist() == pytest.approx([plain[0].item() - 1.5 * 2 / 5, plain[1].item()])
