"""Checkpoints: save a run at a phase boundary and continue it later.

A checkpoint holds the policy and value head, the optimiser and scheduler, every random state,
the phase reached and the metrics so far (`RLHFTrainer.state_dict`). The reference model is not
saved: it is the base model as loaded, so a resumed run reloads it from `args.base_model`.
Files are written to a temporary name and renamed, so a crash mid-write never leaves a broken one.
"""

import os
from pathlib import Path

import torch

from minirlhf.trainer import RLHFTrainer

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(trainer: RLHFTrainer, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `folder/checkpoint.pt` atomically; `extra` is stored beside the trainer state."""
    path = Path(folder) / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"trainer": trainer.state_dict(), "extra": extra or {}}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The dict `save_checkpoint` wrote, with a clear error when there is none."""
    path = Path(folder) / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Train first (`minirlhf train --out {folder}`), "
            "or point --out / --run at the folder of an earlier run."
        )
    # weights_only=False: the checkpoint holds Python random states and metric dicts (our own).
    return torch.load(path, map_location=map_location, weights_only=False)
