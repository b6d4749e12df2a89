"""What a run was built from (issue 29): reward models checked like checkpoints, and the inputs
a run records by hash, refused when they change.

Oracles: a reward model saved by `save_reward_model` and then altered by hand (a weight taken
out, a byte flipped, its record removed), each of which the old loader accepted.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from minirlhf.pairs.reward_model import (
    RewardModel,
    RewardModelError,
    load_reward_model,
    save_reward_model,
    set_trainable_layers,
)
from minirlhf.runtime.loading import load_tiny_model


@pytest.fixture
def saved_rm(tmp_path) -> Path:
    torch.manual_seed(0)
    model = RewardModel(load_tiny_model())
    set_trainable_layers(model, 1)
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
