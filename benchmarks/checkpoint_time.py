"""Benchmark: what verified checkpoints cost against a bare `torch.save` / `torch.load`.

The state has SmolLM2-135M's size: 134.5M float32 weights plus AdamW's two moments (1.6 GB on
disk). `save_checkpoint` adds the finite check, fsync and the SHA-256; `load_checkpoint` the
SHA-256 and the finite check. Prints the best of `--repeats` runs of each.

    python benchmarks/checkpoint_time.py --repeats 3
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from minirlhf.cli.checkpoint import load_checkpoint, save_checkpoint

SMOLLM2_PARAMETERS = 134_515_008


def make_state(parameters: int, tensors: int = 30) -> dict:
    """A trainer state of that many weights, in `tensors` pieces, with AdamW moments."""
    sizes = [parameters // tensors] * tensors
    moments = {i: {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n),
                   "step": torch.tensor(5.0)} for i, n in enumerate(sizes)}
    return {"model": {f"w{i}": torch.randn(n) for i, n in enumerate(sizes)},
            "optimizer": {"state": moments, "param_groups": []}, "scheduler": {}, "rng": {},
            "phase": 5, "global_step": 40, "history": []}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary folder)")
    ns = parser.parse_args()
    state = make_state(SMOLLM2_PARAMETERS)
    folder = Path(tempfile.mkdtemp(dir=ns.dir))
    try:
        bare = folder / "bare.pt"
        bare_save = best_time(lambda: torch.save({"trainer": state, "extra": {}}, bare),
                              ns.repeats)
        bare_load = best_time(lambda: torch.load(bare, weights_only=True), ns.repeats)
        save = best_time(lambda: save_checkpoint(state, folder), ns.repeats)
        load = best_time(lambda: load_checkpoint(folder), ns.repeats)
        size = (folder / "checkpoint.pt").stat().st_size
    finally:
        shutil.rmtree(folder)
    print(f"{size / 1e9:.2f} GB, best of {ns.repeats}: save {bare_save:.2f} s bare, "
          f"{save:.2f} s save_checkpoint; load {bare_load:.2f} s bare, {load:.2f} s "
          f"load_checkpoint ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
