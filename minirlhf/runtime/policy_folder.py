"""A finished run's policy as a base model: how `--base-model <sft run folder>` loads.

Below the pipeline, beside `runtime.loading`. `minirlhf sft` ends by writing, into its run
folder, `policy.pt` (the trained policy's whole `state_dict`, LoRA adapters merged into the
weights) and `policy.json` (the base model it was built on, the file's size and SHA-256).
`loading.load_policy` reads such a folder as one more kind of base model: the base model's
architecture and tokenizer, then these weights, every one trainable again. So RL, DPO and the
reward model start from the SFT policy, and RL's reference (the policy as loaded) is the SFT
model, not the model SFT started from.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from minirlhf.runtime.hashing import sha256_of
from minirlhf.runtime.tied import untie_if_saved_apart

POLICY_NAME = "policy.pt"
RECORD_NAME = "policy.json"
FORMAT = "minirlhf-policy-1"


def is_run_folder(path: Path) -> bool:
    """Whether `path` is a minirlhf run folder (finished or not) rather than a model folder."""
    return path.is_dir() and not (path / "config.json").exists() and (
        (path / RECORD_NAME).is_file() or (path / "run.json").is_file())


def get_policy_state(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """What `policy.pt` holds: the model's whole `state_dict` (merge LoRA adapters first)."""
    assert not hasattr(model, "lora"), "merge the LoRA adapters first (lora.merge_lora)"
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def make_policy_record(path: Path, base_model: str) -> dict:
    """`policy.json` for the written `policy.pt` at `path`: a base model named by a path is
    recorded as an absolute one, so the run folder loads from anywhere."""
    base = Path(base_model).expanduser()
    name = str(base.resolve()) if base.exists() else base_model
    return {"format": FORMAT, "base_model": name, "bytes": path.stat().st_size,
            "sha256": sha256_of(path)}


def read_policy_record(folder: Path) -> dict:
    """The folder's `policy.json`, its `policy.pt` checked against it.

    Raises:
        ValueError: saying what is missing or damaged and what to do.
    """
    if not (folder / RECORD_NAME).is_file():
        raise ValueError(
            f"{folder} is a minirlhf run folder with no {POLICY_NAME}: only a finished "
            f"`minirlhf sft` run is a base model (continue one with `minirlhf sft --out "
            f"{folder} --resume`); a PPO or DPO run becomes one with `minirlhf export --run "
            f"{folder} --out MODEL_FOLDER`.")
    record = json.loads((folder / RECORD_NAME).read_text())
    path = folder / POLICY_NAME
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{folder / RECORD_NAME} is not a {FORMAT} record: run the SFT again.")
    if not path.is_file() or path.stat().st_size != record["bytes"] or (
            sha256_of(path) != record["sha256"]):
        raise ValueError(f"{path} is missing or differs from the size and SHA-256 in "
                         f"{RECORD_NAME} (cut short, or changed after saving): not loaded.")
    return record


def load_policy_folder(
    folder: Path, load_base: Callable[..., HookedTransformer], device: str | torch.device
) -> HookedTransformer:
    """The policy of a finished SFT run: `load_base(record's base_model, device)` (a name, a
    model folder, or another run folder), with the weights of `policy.pt` (read with
    `weights_only=True`: no code runs)."""
    record = read_policy_record(folder)
    model = load_base(record["base_model"], device)
    state = torch.load(folder / POLICY_NAME, map_location=device, weights_only=True)
    untie_if_saved_apart(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / POLICY_NAME} does not fit {record['base_model']} (missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}).")
    return model.eval()
