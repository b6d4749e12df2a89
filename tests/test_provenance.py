"""What a run was built from (issue 29): reward models checked like checkpoints, and the inputs
a run records by hash, refused when they change.

Oracles: a reward model saved by `save_reward_model` and then altered by hand (a weight taken
out, a byte flipped, its record removed), each of which the old loader accepted.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from minirlhf import cli
from minirlhf.cli.provenance import ChangedInputError, check_inputs, get_inputs
from minirlhf.pairs.reward_model import (
    RewardModel,
    RewardModelError,
    load_reward_model,
    prepare_reward_model,
    save_reward_model,
)
from minirlhf.runtime.loading import load_tiny_model


@pytest.fixture
def saved_rm(tmp_path) -> Path:
    torch.manual_seed(0)
    model = RewardModel(load_tiny_model())
    prepare_reward_model(model, 1)
    save_reward_model(model, tmp_path, {"base_model": "tiny"})
    return tmp_path


def rewrite(folder: Path, edit):
    """Re-save reward_model.pt after `edit(state_dict)`, with a record that matches it (what a
    user copying files around, or an attacker, could produce)."""
    path = folder / "reward_model.pt"
    saved = torch.load(path, weights_only=True)
    edit(saved["state_dict"])
    torch.save(saved, path)
    record = json.loads((folder / "reward_model.json").read_text())
    data = path.read_bytes()
    record |= {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "reward_model.json").write_text(json.dumps(record))


def test_a_reward_model_round_trips_with_its_frozen_weights_left_out(saved_rm):
    record = json.loads((saved_rm / "reward_model.json").read_text())
    assert any(name.startswith("base_model.blocks.0.") for name in record["frozen"])
    assert "reward_head.weight" not in record["frozen"]
    load_reward_model(saved_rm)


@pytest.mark.parametrize("weight", ["reward_head.weight", "base_model.blocks.1.mlp.W_out"])
def test_a_reward_model_missing_a_trained_weight_is_refused(saved_rm, weight):
    """The old loader checked only unexpected keys: PPO then trained against a random head."""
    rewrite(saved_rm, lambda state: state.pop(weight))
    with pytest.raises(RewardModelError, match=f"missing \\['{weight}'\\]"):
        load_reward_model(saved_rm)


def test_a_damaged_or_unrecorded_reward_model_is_refused(saved_rm):
    path = saved_rm / "reward_model.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RewardModelError, match="SHA-256"):
        load_reward_model(saved_rm)
    (saved_rm / "reward_model.json").unlink()
    with pytest.raises(RewardModelError, match="reward_model.json is missing"):
        load_reward_model(saved_rm)


# ---- a run's inputs by hash: refused on resume, sample and export when changed ----

FAST = ["--preset", "tiny-smoke", "--table-every", "0", "--batch-size", "4", "--gen-len", "6",
        "--total-phases", "2", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory) -> Path:
    """A finished 2-phase tiny run on a prompt file."""
    folder = tmp_path_factory.mktemp("prompt_run")
    (folder / "prompts.txt").write_text("".join(f"Prompt {i} is\n" for i in range(8)))
    cli.main(["train", *FAST, "--prompts", str(folder / "prompts.txt"), "--out",
              str(folder / "run")])
    return folder


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source / "run", out)
    return out


def test_a_changed_prompt_file_is_refused_by_resume_sample_and_export(prompt_run, tmp_path,
                                                                      capsys):
    out = copy_run(prompt_run, tmp_path)
    prompts = prompt_run / "prompts.txt"
    original = prompts.read_text()
    try:
        prompts.write_text(original.replace("Prompt 3", "Prompt three"))
        for command in (["train", "--out", str(out), "--resume", "--total-phases", "3"],
                        ["sample", "--run", str(out), "-n", "2", "--gen-len", "2"],
                        ["export", "--run", str(out), "--out", str(tmp_path / "hf")]):
            with pytest.raises(SystemExit):
                cli.main(command)
            error = capsys.readouterr().err
            assert f"the prompt file {prompts} changed" in error, (command, error)
            assert "--accept-changed-inputs" in error
        assert not (tmp_path / "hf").exists()
        cli.main(["sample", "--run", str(out), "-n", "2", "--gen-len", "2",
                  "--accept-changed-inputs"])
        assert "--accept-changed-inputs: the prompt file" in capsys.readouterr().err
    finally:
        prompts.write_text(original)


def test_a_changed_base_model_or_reward_model_folder_is_named(tmp_path):
    """A base model folder re-exported, a reward model retrained into the same folder."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "reward_model.pt").write_bytes(b"reward head")
    run = {"args": {"base_model": str(tmp_path / "base")},
           "reward": {"kind": "reward_model", "path": str(tmp_path / "rm")}}
    run["inputs"] = get_inputs(run)
    check_inputs(run, accept=False)
    for changed, name in [(tmp_path / "base" / "model.safetensors", "base model folder"),
                          (tmp_path / "rm" / "reward_model.pt", "reward model")]:
        original = changed.read_bytes()
        changed.write_bytes(b"other " + original)
        with pytest.raises(ChangedInputError, match=f"the {name} {changed.parent} changed"):
            check_inputs(run, accept=False)
        changed.write_bytes(original)
    check_inputs(run, accept=False)


# ---- run.json edited by hand: compared with the checkpoint's args ----

@pytest.mark.parametrize("field, value", [("gen_len", 7), ("base_lr", 0.5), ("kl_coef", 0.9)])
def test_a_run_json_edit_is_refused_on_resume(prompt_run, tmp_path, capsys, field, value):
    """The old resume applied gen_len (and batch size, temperature, the reward) from an edited
    run.json, and silently ignored base_lr and kl_coef: now each is named."""
    out = copy_run(prompt_run, tmp_path)
    run = json.loads((out / "run.json").read_text())
    run["args"][field] = value
    (out / "run.json").write_text(json.dumps(run))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(out), "--resume", "--total-phases", "3"])
    error = capsys.readouterr().err
    assert "run.json was edited" in error and f"{field} is" in error
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_run_json_reward_edit_is_refused_on_resume(prompt_run, tmp_path, capsys):
    out = copy_run(prompt_run, tmp_path)
    run = json.loads((out / "run.json").read_text())
    run["reward"]["char"] = "e"
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(out), "--resume", "--total-phases", "3"])
    assert "reward is" in capsys.readouterr().err


def test_an_sft_run_as_base_model_is_recorded_by_its_policy_alone(tmp_path):
    """A run on an SFT run folder hashes the folder's policy.pt, not its checkpoints (gigabytes
    for SmolLM2, hashed again by every sample, export and --resume), and still sees the policy
    change."""
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "policy.json").write_text("{}")
    (sft / "policy.pt").write_bytes(b"policy")
    (sft / "checkpoint.pt").write_bytes(b"checkpoint")
    run = {"args": {"base_model": str(sft)}, "reward": {"kind": "vader"}}
    before = get_inputs(run)
    (sft / "checkpoint.pt").write_bytes(b"another checkpoint")
    assert get_inputs(run) == before
    (sft / "policy.pt").write_bytes(b"another policy")
    assert get_inputs(run)["base_model"] != before["base_model"]


def test_train_refuses_a_bad_reward_model_before_writing_its_folder(saved_rm, tmp_path, capsys):
    """The check runs in the pre-flight: the old order wrote run.json and metrics.jsonl into
    --out, then refused the reward model, leaving a folder a --resume fails on the same way."""
    rewrite(saved_rm, lambda state: state.pop("reward_head.weight"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--preset", "tiny-smoke", "--reward-model", str(saved_rm),
                  "--out", str(out), "--table-every", "0"])
    assert stop.value.code == 2
    assert "missing ['reward_head.weight']" in capsys.readouterr().err
    assert not out.exists()
