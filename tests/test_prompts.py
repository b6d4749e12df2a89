"""Tests for minirlhf.prompts (prompt files, the held-out split, each phase's groups) and the
trainer drawing from a prompt file and scoring the held-out prompts."""

import json

import pytest
import torch
from rich.console import Console
from test_trainer import E2E_ARGS

from minirlhf.args import RLHFArgs
from minirlhf.prompts import (
    REVIEW_PROMPTS,
    get_phase_prompts,
    load_prompts,
    resolve_prompt_file,
    split_prompts,
)
from minirlhf.rewards import reward_fn_char_count
from minirlhf.trainer import RLHFTrainer


def test_text_and_jsonl_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("First one\n\n  Second, with spaces\n")
    assert load_prompts(text) == ["First one", "  Second, with spaces"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "A"}) + "\n" + json.dumps({"prompt": "B", "x": 1}))
    assert load_prompts(jsonl) == ["A", "B"]
    jsonl.write_text(json.dumps({"prompt": "A"}) + "\n" + json.dumps({"text": "B"}))
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected"):
        load_prompts(jsonl)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_the_shipped_review_prompts():
    prompts = load_prompts(resolve_prompt_file("reviews"))
    assert resolve_prompt_file("reviews") == REVIEW_PROMPTS
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert all(p.isascii() and 1 <= len(p.split()) <= 15 for p in prompts)


def test_split_is_seeded_disjoint_and_complete():
    prompts = [f"p{i}" for i in range(50)]
    train, held_out = split_prompts(prompts, 0.1, seed=1)
    assert len(held_out) == 5 and sorted(train + held_out) == sorted(prompts)
    assert not set(train) & set(held_out)
    assert split_prompts(prompts, 0.1, seed=1) == (train, held_out)
    assert split_prompts(prompts, 0.1, seed=2) != (train, held_out)
    assert split_prompts(["a", "b"], 0.01, seed=1)[1] != []  # a fraction > 0 holds one out
    assert split_prompts(["a", "b"], 0.0, seed=1)[1] == []


def test_phase_prompts_are_adjacent_groups():
    prompts = [f"p{i}" for i in range(10)]
    drawn = get_phase_prompts(prompts, 4, 3, torch.Generator().manual_seed(0))
    groups = [drawn[g * 3 : (g + 1) * 3] for g in range(4)]
    assert all(len(set(group)) == 1 for group in groups)
    assert len({group[0] for group in groups}) == 4  # without replacement
    few = get_phase_prompts(["a", "b"], 5, 2, torch.Generator().manual_seed(0))
    assert len(few) == 10 and set(few) <= {"a", "b"}


def test_trainer_draws_from_the_file_and_scores_held_out_prompts(tmp_path, make_printable_model):
    # Prompts the 94-token model can read: one printable character each.
    (tmp_path / "p.txt").write_text("\n".join("ABCDEFGHIJKLMNOPQRST"))
    args = RLHFArgs(**{**E2E_ARGS, "prefix": "unused", "prompts": str(tmp_path / "p.txt"),
                       "held_out_fraction": 0.25, "eval_every": 2, "total_phases": 3,
                       "batch_size": 8, "num_minibatches": 2, "gen_len": 4,
                       "advantage_estimator": "rloo", "group_size": 2})
    trainer = RLHFTrainer(args, reward_fn_char_count, base_model=make_printable_model(seed=6),
                          console=Console(quiet=True), table_every=0)
    assert len(trainer.held_out_prompts) == 5 and len(trainer.train_prompts) == 15
    rollouts = [trainer.train_one_phase() for _ in range(3)]
    for rollout in rollouts:
        prompts = [sample[0] for sample in rollout.texts]
        assert all(p in trainer.train_prompts for p in prompts)
        assert all(prompts[2 * g] == prompts[2 * g + 1] for g in range(4))
    assert [("eval/held_out_reward" in r.metrics) for r in rollouts] == [True, False, True]
    with pytest.raises(ValueError, match="give one"):
        RLHFTrainer(args, reward_fn_char_count, base_model=make_printable_model(seed=6),
                    prompts=["A"] * 8, console=Console(quiet=True))
