"""Check: two checkouts of minirlhf train the same, variant by variant, phase by phase.

Before/after a change meant to leave training as it was (the seams redesign): each checkout, in
its own process (PYTHONPATH), trains 13 tiny variants for 3 phases (every advantage estimator,
the KL in the loss and in the reward, LoRA, a frozen trunk, adaptive KL, the reference's residual
kept, TransformerLens's forward) and the per-phase metrics are compared: the largest relative
difference of every metric both log, the metrics only one logs, and which checkpoint tensors
differ by name.

    git worktree add /tmp/old d3bf5bf
    python benchmarks/compare_metrics.py /tmp/old .

Uses only what both sides of the redesign have (RLHFArgs, RLHFTrainer, the exercises' char model).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, sys, torch
from rich.console import Console
from minirlhf import RLHFArgs, RLHFTrainer
from minirlhf.exercises.core import load_char_model
torch.set_num_threads(1)
BASE = dict(total_phases=3, batch_size=8, num_minibatches=2, gen_len=6, prefix="A",
            prepend_bos=False, seed=0, base_lr=1e-3, head_lr=1e-3, warmup_steps=0)
VARIANTS = {
    "one_step": {}, "gae": dict(advantage_estimator="gae"),
    "grpo": dict(advantage_estimator="grpo", group_size=4),
    "dr_grpo": dict(advantage_estimator="dr_grpo", group_size=4),
    "rloo": dict(advantage_estimator="rloo", group_size=4),
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", group_size=4, kl_in="reward",
                         kl_estimator="k3"),
    "grpo_k3_loss": dict(advantage_estimator="grpo", group_size=4, kl_estimator="k3"),
    "gae_lora": dict(advantage_estimator="gae", lora_rank=4, lora_alpha=8.0),
    "gae_trunk": dict(advantage_estimator="gae", trainable_layers=1),
    "grpo_trunk_lora": dict(advantage_estimator="grpo", group_size=4, trainable_layers=1,
                            lora_rank=4),
    "gae_adaptive": dict(advantage_estimator="gae", kl_target=0.05),
    "gae_recompute": dict(advantage_estimator="gae", recompute_ref_logits=True),
    "gae_nofast": dict(advantage_estimator="gae", fast_path=False),
}
def reward(texts):
    return [sum(c.islower() for c in t) / 3.0 for t in texts]
out = {}
for name, overrides in VARIANTS.items():
    torch.manual_seed(0)
    trainer = RLHFTrainer(RLHFArgs(**{**BASE, **overrides}), reward, base_model=load_char_model(),
                          console=Console(quiet=True), table_every=0)
    history = trainer.train()
    out[name] = {"history": [{k: v for k, v in h.items() if "time" not in k} for h in history],
                 "tensors": sorted(trainer.state_dict()["model"])}
json.dump(out, open(sys.argv[1], "w"))
"""


def run(checkout: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    subprocess.run([sys.executable, "-c", WORKER, str(out)], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def relative_gap(a: float, b: float) -> float:
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(1e-6, abs(a))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    ns = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    old, new = run(ns.old, folder / "old.json"), run(ns.new, folder / "new.json")
    worst = 0.0
    for name in old:
        first, second = old[name]["history"], new[name]["history"]
        gaps = [relative_gap(a[k], b[k])
                for a, b in zip(first, second) for k in a.keys() & b.keys()]
        only = sorted({k for a, b in zip(first, second) for k in a.keys() ^ b.keys()})
        tensors = sorted(set(old[name]["tensors"]) ^ set(new[name]["tensors"]))
        worst = max(worst, *gaps)
        print(f"{name:16s} largest relative gap {max(gaps):.1e}; logged by one side only: "
              f"{only or 'none'}; checkpoint tensors on one side only: {tensors or 'none'}")
    print(f"largest relative gap over every variant, phase and shared metric: {worst:.1e}")


if __name__ == "__main__":
    main()
