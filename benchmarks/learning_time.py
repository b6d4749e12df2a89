"""Benchmark: what the memory settings of a full-weight learning phase cost in time.

The job of `benchmarks/learning_memory.py` (SmolLM2, every weight trained, GRPO, batch 32 in 4
minibatches, 64-token answers, float32, `recompute_ref_logits=True`), one learning pass per
phase. Four settings, each in a fresh process: activation checkpointing off or on, under glibc's
default allocator or with `MALLOC_MMAP_THRESHOLD_=131072`. Each process samples one rollout,
runs one learning phase to warm up (AdamW's state is allocated there), then times three more on
the same rollout, and prints the times and its peak resident memory. `--repeats 2` runs the four
settings twice, interleaved, so that a change of load shows as a disagreement between repeats.

    python benchmarks/learning_time.py --threads 2 --repeats 2

Measured 2026-12-07 (2-core AMD EPYC with AVX512-BF16, unused: float32; 2 threads, the machine
otherwise quiet), learning phase in seconds (three timed phases; two repeats):

| checkpointing | allocator | repeat 1 | repeat 2 | process peak (MiB) |
|---|---|---|---|---|
| off | default | 17.1, 17.2, 18.0 | 19.9, 18.6, 18.4 | 5,065 / 5,032 |
| off | mmap threshold | 22.6, 26.4, 24.5 | 23.0, 22.4, 23.1 | 4,591 / 4,591 |
| on | default | 21.4, 20.9, 21.8 | 22.1, 24.1, 23.2 | 4,491 / 4,505 |
| on | mmap threshold | 28.3, 31.5, 27.5 | 30.1, 30.0, 28.8 | 3,764 / 3,764 |

Checkpointing costs about a fifth more learning time (the extra forward pass of every block),
the mmap threshold a fifth to two fifths more (each large tensor a fresh mapping, its pages
zeroed by the kernel on first touch).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from learning_memory import MMAP, make_trainer, read_status_mib

ROOT = Path(__file__).resolve().parent.parent


def child(checkpointing: bool, threads: int):
    """One setting, in this fresh process: the learning phase's times and the peak memory."""
    trainer = make_trainer(threads, 32, 64, 1, recompute_ref_logits=True,
                           activation_checkpointing=checkpointing)
    rollout = trainer.rollout_phase()
    trainer.learning_phase(rollout.memory)  # warm-up: AdamW's state
    times = []
    for _ in range(3):
        started = time.perf_counter()
        trainer.learning_phase(rollout.memory)
        times.append(round(time.perf_counter() - started, 2))
    print(json.dumps({"checkpointing": checkpointing, "mmap_threshold": "MALLOC_MMAP_THRESHOLD_"
                      in os.environ, "learning_s": times,
                      "peak_mib": round(read_status_mib("VmHWM"))}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        return child(ns.child == "1", ns.threads)
    sys.path.insert(0, str(ROOT))
    from minirlhf.runtime.device import describe_cpu

    print(describe_cpu(), f"{ns.threads} thread(s)")
    for _ in range(ns.repeats):
        for checkpointing in ("0", "1"):
            for extra in ({}, MMAP):
                env = {**os.environ, **extra, "OMP_NUM_THREADS": str(ns.threads)}
                out = subprocess.run([sys.executable, __file__, "--child", checkpointing,
                                      "--threads", str(ns.threads)], capture_output=True,
                                     text=True, env=env, cwd=ROOT, check=True)
                print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
