"""`minirlhf preferences`, `minirlhf reward-model` and `minirlhf train --reward-model` on tiny."""

import json

import pytest
import torch

from minirlhf import cli
from minirlhf.pairs.preferences import read_preferences

PREFS = ["preferences", "--base-model", "tiny", "--prompt", "This is", "--num-pairs", "24",
         "--gen-len", "6", "--batch-size", "16", "--judge", "char_count", "--char", "e",
         "--min-gap", "0.5", "--margin"]
RM = ["--base-model", "tiny", "--epochs", "1", "--batch-size", "8", "--eval-every", "2",
      "--normalize-samples", "8", "--normalize-prompt", "This is", "--normalize-gen-len", "6"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Preferences -> reward model, once for the tests below."""
    folder = tmp_path_factory.mktemp("pipeline")
    cli.main([*PREFS, "--out", str(folder / "prefs.jsonl")])
    cli.main(["reward-model", "--data", str(folder / "prefs.jsonl"), "--out",
              str(folder / "rm"), *RM])
    return folder


def test_preferences_writes_judged_pairs(pipeline):
    prefs = read_preferences(pipeline / "prefs.jsonl")
    assert len(prefs) == 24
    for p in prefs:
        assert p.prompt == "This is"
        assert p.chosen_text.count("e") - p.rejected_text.count("e") > 0.5
        assert p.margin == p.chosen_score - p.rejected_score


def test_reward_model_writes_checkpoint_metrics_plot_and_summary(pipeline):
    out = pipeline / "rm"
    assert (out / "reward_model.pt").is_file()
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["charts/step"] for m in metrics] == [0, 1, 2]  # 19 train pairs, 8 a step
    assert "heldout/accuracy" in metrics[-1] and "train/loss" in metrics[0]
    info = json.loads((out / "reward_model.json").read_text())
    assert info["base_model"] == "tiny" and info["args"]["use_margin"] is True
    assert set(info["normalization"]) == {"raw_mean", "raw_std", "gain", "bias"}


def test_train_runs_ppo_against_the_reward_model(pipeline, tmp_path):
    out = tmp_path / "ppo"
    cli.main(["train", "--preset", "tiny-smoke", "--reward-model", str(pipeline / "rm"),
              "--table-every", "0", "--batch-size", "4", "--gen-len", "6", "--total-phases",
              "2", "--out", str(out)])
    run = json.loads((out / "run.json").read_text())
    assert run["reward"] == {"kind": "reward_model", "path": str((pipeline / "rm").resolve())}
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["phase"] == 2


def test_bad_reward_model_flags_say_what_to_do(pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "tiny-smoke", "--reward", "reward_model",
                  "--out", str(tmp_path / "a")])
    assert "--reward-model FOLDER" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "tiny-smoke", "--reward-model", str(tmp_path),
                  "--out", str(tmp_path / "b")])
    assert "no reward_model.pt" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "", "chosen": "a"}\n')
    with pytest.raises(SystemExit):
        cli.main(["reward-model", "--data", str(bad), "--out", str(tmp_path / "rm"), *RM])
    assert "line 1: missing ['rejected']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*PREFS, "--batch-size", "7", "--out", str(tmp_path / "p.jsonl")])
    assert "must be even" in capsys.readouterr().err
