"""The pure helpers of the TRL peer benchmark (benchmarks/trl_peer.py and trl_peer_trl.py): the
text TRL's reward scores, the LR schedule it is given and the prompts it is fed must be
minirlhf's, or the comparison compares different jobs. The benchmark itself is not run here."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from minirlhf.args import RLHFArgs
from minirlhf.prompts import (
    get_phase_prompts,
    load_prompt_split,
    load_prompts,
    prompt_text,
    split_prompts,
)
from minirlhf.runtime.loading import load_tiny_model
from minirlhf.trainer import RLHFTrainer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trl_side = load_script("trl_peer_trl")
peer = load_script("trl_peer")

# ---- the reward text ----

PROMPT, COMPLETION = "I loved the score", " and the acting."
# VADER by hand: "loved" is the only word in its lexicon (valence 2.9), no booster, negation,
# "but" or "!" applies, so compound = 2.9 / sqrt(2.9^2 + 15) (alpha = 15), rounded to 4 places.
# The completion alone has no sentiment word: 0.
LOVED_COMPOUND = round(2.9 / math.sqrt(2.9**2 + 15), 4)


def completion_only_reward(prompts, completions, **kwargs):
    """The mistake the check must catch: scoring TRL's completion without its prompt."""
    return trl_side.vader_compound(list(completions))


def reward_scores_prompt_and_completion(reward_fn) -> bool:
    return reward_fn(prompts=[PROMPT], completions=[COMPLETION]) == [LOVED_COMPOUND]


@pytest.mark.parametrize("reward_fn, right", [
    (trl_side.make_vader_reward([]), True),
    (completion_only_reward, False),
])
def test_reward_scores_the_text_minirlhf_scores(reward_fn, right):
    assert LOVED_COMPOUND == 0.5994
    assert reward_scores_prompt_and_completion(reward_fn) is right


def test_the_negative_direction_negates_the_reward():
    """The frontier's TRL points in the negative direction once trained on +VADER (the job had
    no direction): the reward must follow it."""
    means = []
    reward_fn = trl_side.make_vader_reward(means, "neg")
    assert reward_fn(prompts=[PROMPT], completions=[COMPLETION]) == [-LOVED_COMPOUND]
    assert means == [-LOVED_COMPOUND]
    with pytest.raises(ValueError, match="direction"):
        trl_side.make_vader_reward([], "negative")


def test_reward_records_each_batch_mean():
    means = []
    reward_fn = trl_side.make_vader_reward(means)
    reward_fn(prompts=[PROMPT, PROMPT], completions=[COMPLETION, " and hated the end"])
    assert means == pytest.approx([(LOVED_COMPOUND + trl_side.vader_compound(
        [PROMPT + " and hated the end"])[0]) / 2])


# ---- the learning-rate schedule ----

def lr_scale_from_zero(phase, warmup_steps, total_phases, final_scale):
    """The mistake the check must catch: warmup starting at LR 0 (p / warmup)."""
    if phase < warmup_steps:
        return phase / warmup_steps
    return trl_side.get_lr_scale(phase, warmup_steps, total_phases, final_scale)


def schedule_matches(lr_scale) -> bool:
    # warmup 2 of 5 phases, decay to 0.5 over phases 2..4, worked by hand:
    return [lr_scale(p, 2, 5, 0.5) for p in range(5)] == pytest.approx([0.5, 1, 1, 0.75, 0.5])


@pytest.mark.parametrize("lr_scale, right", [
    (trl_side.get_lr_scale, True),
    (lr_scale_from_zero, False),
])
def test_trl_lr_schedule_is_minirlhfs(lr_scale, right):
    assert schedule_matches(lr_scale) is right


# ---- the prompts fed to TRL ----

def draw_with_the_wrong_seed(args: RLHFArgs) -> list[list[str]]:
    """The mistake the check must catch: a generator seeded with the run's seed, not seed + 2."""
    train_prompts, _ = split_prompts(load_prompts(peer.resolve_prompt_file(args.prompts)),
                                     args.held_out_fraction, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    return [[prompt_text(record) for record in get_phase_prompts(
        train_prompts, args.prompts_per_phase, args.group_size, generator)[:: args.group_size]]
        for _ in range(args.total_phases)]


@pytest.mark.parametrize("draw, right", [
    (peer.draw_phase_prompts, True),
    (draw_with_the_wrong_seed, False),
])
def test_trl_gets_the_prompts_the_trainer_draws(draw, right):
    args = RLHFArgs(prompts="reviews", held_out_fraction=0.0, group_size=4, batch_size=8,
                    num_minibatches=2, total_phases=3, warmup_steps=0, seed=5)
    assert (trainer_draws(args) == repeated(draw(args), args.group_size)) is right


def trainer_draws(args: RLHFArgs, split: tuple | None = None) -> list[list[str]]:
    """The prompt texts of each phase as RLHFTrainer draws them (TRL is fed texts)."""
    trainer = RLHFTrainer(args, lambda samples: [0.0] * len(samples),
                          base_model=load_tiny_model(), console=Console(quiet=True),
                          prompt_split=split)
    return [[prompt_text(record) for record in trainer.get_phase_prompts()]
            for _ in range(args.total_phases)]


def repeated(phases: list[list[str]], group_size: int) -> list[list[str]]:
    """Each phase's distinct prompts, each `group_size` times, as the trainer's rows are."""
    return [[p for p in phase for _ in range(group_size)] for phase in phases]


def draw_ignoring_the_split_seed(args: RLHFArgs, split_seed: int) -> list[list[str]]:
    """The mistake the check must catch: --train-seed's run split by the training seed."""
    return peer.draw_phase_prompts(args)


@pytest.mark.parametrize("draw, right", [
    (peer.draw_phase_prompts, True),
    (draw_ignoring_the_split_seed, False),
])
def test_trl_gets_the_prompts_of_a_split_made_with_another_seed(draw, right):
    """frontier.py --train-seed: the trainer is handed --seed's split and seeded by the other."""
    args = RLHFArgs(prompts="reviews", held_out_fraction=0.5, group_size=4, batch_size=8,
                    num_minibatches=2, total_phases=3, warmup_steps=0, seed=7)
    split = load_prompt_split(args.prompts, args.held_out_fraction, 5)
    expected = repeated(draw(args, split_seed=5), args.group_size)
    assert (trainer_draws(args, split) == expected) is right


# ---- the summary ----

def summarise_counting_the_first_phase(side: dict, batch_size: int) -> dict:
    """The mistake the check must catch: samples per second with the first (warm-up) phase."""
    summary = peer.summarise(side, batch_size)
    return {**summary, "samples_per_s": summary["samples_per_s_with_first"]}


@pytest.mark.parametrize("summarise, right", [
    (peer.summarise, True),
    (summarise_counting_the_first_phase, False),
])
def test_summary_by_hand(summarise, right):
    side = {"phase_time_s": [10.0, 4.0, 6.0], "reward_mean_per_phase": [0.1, 0.2, 0.6]}
    summary = summarise(side, batch_size=32)
    assert summary["s_per_phase_after_first"] == 5.0
    assert summary["samples_per_s_with_first"] == pytest.approx(96 / 20)  # 3 phases in 20 s
    assert summary["reward_last_phases"] == pytest.approx(0.3)
    # 2 phases of 32 samples in 10 s, not counting the first:
    assert (summary["samples_per_s"] == pytest.approx(64 / 10)) is right
