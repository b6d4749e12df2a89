"""Benchmark: one PPO phase of two checkouts of minirlhf, paired phase by phase.

Before/after a change that should not slow the trainer down: each checkout runs in its own
long-lived process (the offline preset, SmolLM2 + VADER, float32, after one warm-up phase), and
the two take phases in turn (A B, B A, A B, ...), so both see the same load of a shared machine.
Prints every phase's times and, per pair, the ratio new / old.

    git worktree add /tmp/old <commit>
    python benchmarks/compare_checkouts.py /tmp/old . --pairs 8 --threads 1
    python benchmarks/compare_checkouts.py /tmp/old . --pairs 6 --threads 2 --job trl-peer-full

`--job trl-peer-full`: benchmarks/trl_peer.py's job with every weight trained instead (GRPO,
batch 32, 20 tokens, 8 optimiser steps a phase; each checkout's own trl_peer.py builds it).

Each process imports minirlhf from its checkout (PYTHONPATH), so the checkouts may differ in API:
the worker below uses only what both sides of the redesign have (presets, RLHFTrainer).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ["charts/phase_time", "charts/sample_time", "charts/forward_time", "charts/learning_time"]

WORKER = """
import json, sys, torch
from rich.console import Console
from minirlhf.args import RLHFArgs
from minirlhf.trainer import RLHFTrainer
try:
    from minirlhf.cli.presets import PRESETS, make_reward_fn
except ImportError:  # before the command line became a package (d3bf5bf and older)
    from minirlhf.presets import PRESETS, make_reward_fn
torch.set_num_threads(int(sys.argv[1]))
args = RLHFArgs(**{**PRESETS["smollm2-vader"]["args"], "total_phases": 100, "precision": "fp32"})
if sys.argv[2] == "trl-peer-full":
    sys.path.insert(0, "benchmarks")
    from trl_peer import get_args
    args = get_args(lora=False, phases=100, seed=1)
trainer = RLHFTrainer(args, make_reward_fn({"kind": "vader", "direction": "pos"}, "cpu"),
                      console=Console(quiet=True), table_every=0)
trainer.train_one_phase()  # warm-up
print("ready", flush=True)
for _ in sys.stdin:
    result = trainer.train_one_phase()
    metrics = getattr(result, "metrics", result)  # a Rollout after the redesign, a dict before
    print(json.dumps({k: metrics[k] for k in KEYS}), flush=True)
""".replace("KEYS", repr(KEYS))


def start(checkout: Path, threads: int, job: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    process = subprocess.Popen([sys.executable, "-c", WORKER, str(threads), job], cwd=checkout,
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while process.stdout.readline().strip() != "ready":
        pass
    return process


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--job", default="preset", choices=["preset", "trl-peer-full"],
                        help="the offline preset (LoRA), or trl_peer.py's full-weight job")
    ns = parser.parse_args()
    print(subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True).stdout.strip(), "| AVX512-BF16:",
          "avx512_bf16" in Path("/proc/cpuinfo").read_text(), flush=True)
    workers = {name: start(path, ns.threads, ns.job)
               for name, path in (("old", ns.old), ("new", ns.new))}
    times: dict[str, list[dict]] = {"old": [], "new": []}
    for pair in range(ns.pairs):
        for name in ("old", "new") if pair % 2 == 0 else ("new", "old"):
            workers[name].stdin.write("phase\n")
            workers[name].stdin.flush()
            times[name].append(json.loads(workers[name].stdout.readline()))
            print(name, {k: round(v, 2) for k, v in times[name][-1].items()}, flush=True)
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    for key in KEYS:
        old, new = (statistics.median(m[key] for m in times[n]) for n in ("old", "new"))
        print(f"{key}: old median {old:.2f} s, new median {new:.2f} s")
    ratios = [n["charts/phase_time"] / o["charts/phase_time"]
              for o, n in zip(times["old"], times["new"])]
    print("new / old phase time per pair:", [round(r, 3) for r in ratios],
          "median", round(statistics.median(ratios), 3))


if __name__ == "__main__":
    main()
