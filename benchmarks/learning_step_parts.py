"""Benchmark: one learning step of trl_peer.py's full-weight job, split into its parts.

The job of `benchmarks/trl_peer.py` with every weight of SmolLM2 trained (GRPO, batch 32, 20 tokens,
8 optimiser steps of 8 answers a phase, float32). Each setting runs in a fresh process (the
allocator setting is process-wide): one rollout and learning phase to warm up (AdamW's state), then
`--phases` rollouts, each followed by the trainer's learning phase of 8 steps, every step timed in
five parts with `time.perf_counter` around what the trainer calls (no profiler, whose own cost
distorts the memory-bound parts): `zero_grad`, the objective (the forward pass, log-probs, KL,
entropy and loss), the backward pass, the gradient clip and the AdamW step. Printed: the median of
each part over the steps, and the process's minor page faults per timed learning phase. Settings:
glibc's default allocator and `keep_freed_memory` (`runtime.allocator`), alternated `--repeats`
times.

    python benchmarks/learning_step_parts.py --threads 2 --repeats 2
"""

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["zero_grad", "objective", "backward", "clip", "adamw_step"]


def time_parts(trainer, times: dict[str, list[float]]):
    """Wrap what `RLHFTrainer.learning_phase` calls in each step (zero_grad, the objective, the
    clip, the AdamW step) so that every call appends its seconds to `times`; the backward pass
    is the time between the objective's end and the clip's start (the calls in between are
    the trainer's finiteness check and, with one process, a no-op). The trainer's own loop runs."""
    import torch

    last_end = [0.0]  # when the last wrapped call returned

    def timed(part: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            if part == "clip":
                times["backward"].append(start - last_end[0])  # after the objective
            result = function(*args, **kwargs)
            times[part].append(time.perf_counter() - start)
            last_end[0] = time.perf_counter()
            return result
        return wrapper

    trainer.optimizer.zero_grad = timed("zero_grad", trainer.optimizer.zero_grad)
    trainer.compute_rlhf_objective = timed("objective", trainer.compute_rlhf_objective)
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_)
    trainer.optimizer.step = timed("adamw_step", trainer.optimizer.step)


def child(keep: bool, threads: int, phases: int):
    """One setting in this fresh process: the median of each part (ms) and the page faults."""
    import torch
    from rich.console import Console

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trl_peer import get_args

    from minirlhf.runtime.loading import load_policy
    from minirlhf.sentiment import make_vader_reward
    from minirlhf.trainer import RLHFTrainer

    torch.set_num_threads(threads)
    args = dataclasses.replace(get_args(lora=False, phases=phases + 1, seed=1),
                               keep_freed_memory=keep)
    trainer = RLHFTrainer(args, make_vader_reward("pos"), base_model=load_policy("smollm2"),
                          console=Console(quiet=True), table_every=0)
    trainer.learning_phase(trainer.rollout_phase().memory)  # warm-up: AdamW's state
    times, faults = {part: [] for part in PARTS}, 0
    time_parts(trainer, times)
    for _ in range(phases):
        memory = trainer.rollout_phase().memory
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        trainer.learning_phase(memory)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    medians = {part: round(statistics.median(values) * 1e3, 1) for part, values in times.items()}
    print(json.dumps({"keep_freed_memory": keep, "median_ms": medians,
                      "step_ms": round(sum(medians.values()), 1),
                      "page_faults_per_phase": faults // phases}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phases", type=int, default=2, help="timed phases per setting")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        return child(ns.child == "keep", ns.threads, ns.phases)
    sys.path.insert(0, str(ROOT))
    from minirlhf.runtime.device import describe_cpu

    machine = describe_cpu()
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, fast bf16: {machine['fast_bf16']} "
          f"(unused: float32), {ns.threads} torch threads", flush=True)
    for _ in range(ns.repeats):
        for setting in ("default", "keep"):
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--threads",
                                  str(ns.threads), "--phases", str(ns.phases)],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
