"""Benchmark: what to train. Full fine-tuning vs LoRA vs a frozen trunk on the offline preset.

Each variant is the `smollm2-vader` preset (SmolLM2-135M, VADER, batch 32, gen_len 20) with a few
fields changed (`VARIANTS`), trained for `--phases` phases in its own fresh process, so that its
peak memory is its own. Printed side by side: the median phase time and its split (sampling,
the rollout's forward passes, the learning phase), the trainable parameters, peak memory (the
process's, and the learning phases' own: the kernel's peak-RSS counter is reset after the first
phase and read against the RSS at that moment), the mean VADER per phase, the first phase whose
mean reached the target, and samples from the last phase.

    python benchmarks/trainable_weights.py                          # every variant, 25 phases
    python benchmarks/trainable_weights.py --phases 4 --out /tmp/timing      # times only
    python benchmarks/trainable_weights.py --report                 # the table of saved runs

Times are only comparable between variants measured on a quiet machine in one invocation; the
reward curves do not depend on timing (each run is seeded). Figures go to
`benchmarks/results/trainable_weights/<variant>.json`. Targets "on a plain CPU" are fp32 on
AVX2: the default is `--precision fp32`, and the header says whether this CPU has fast bf16.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL = {"trainable_layers": None, "lora_rank": 0, "base_lr": 1e-4}
"""Every weight trains: the preset as it was before it adopted LoRA on a frozen trunk."""
VARIANTS: dict[str, dict] = {
    "full": FULL,
    "lora8": {**FULL, "lora_rank": 8, "lora_alpha": 16.0, "base_lr": 1e-3},
    "lora32": {**FULL, "lora_rank": 32, "lora_alpha": 64.0, "base_lr": 1e-3},
    "trunk4": {**FULL, "trainable_layers": 4, "base_lr": 2e-4},
    "trunk6": {**FULL, "trainable_layers": 6, "base_lr": 2e-4},
    "trunk8-lora16": {**FULL, "trainable_layers": 8, "lora_rank": 16, "lora_alpha": 32.0,
                      "base_lr": 1e-3},
}
"""Each variant's RLHFArgs changes to the `smollm2-vader` preset (whose own settings are
trunk8-lora16's). LoRA's adapters start at B = 0 and take a larger learning rate than full
fine-tuning (their updates are scaled by alpha / rank)."""
PARTS = ["charts/sample_time", "charts/forward_time", "charts/learning_time",
         "charts/phase_time"]
RESULTS = Path("benchmarks/results/trainable_weights")


def read_status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def run_variant(ns: argparse.Namespace):
    """In this fresh process: train one variant and write its JSON."""
    import torch
    from rich.console import Console

    from minirlhf.args import RLHFArgs
    from minirlhf.cli.presets import PRESETS
    from minirlhf.sentiment import make_vader_reward
    from minirlhf.trainer import RLHFTrainer

    if ns.threads:
        torch.set_num_threads(ns.threads)
    overrides = VARIANTS[ns.child]
    args = RLHFArgs(**{**PRESETS["smollm2-vader"]["args"], "total_phases": max(ns.phases, 25),
                       "precision": ns.precision, **overrides})
    start = time.perf_counter()
    trainer = RLHFTrainer(args, make_vader_reward("pos"), console=Console(quiet=True),
                          table_every=0)
    setup_s = time.perf_counter() - start
    trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]
                    if g is trainer.optimizer.param_groups[0])
    phases, peak, start_rss = [], None, None
    for phase in range(ns.phases):
        rollout = trainer.train_one_phase()
        phases.append({k: v for k, v in rollout.metrics.items() if k.startswith("charts/")})
        if phase == 0:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
            start_rss = read_status_kib("VmRSS")
        print(f"{ns.child} phase {phase}: reward {phases[-1]['charts/reward_mean']:.3f} "
              f"({phases[-1]['charts/phase_time']:.1f} s)", flush=True)
    peak = read_status_kib("VmHWM")
    result = {"variant": ns.child, "overrides": overrides, "precision": trainer.precision,
              "threads": torch.get_num_threads(), "trainable_params": trainable,
              "setup_s": setup_s, "peak_rss_mib": peak / 1024,
              "phase_peak_over_start_mib": (peak - start_rss) / 1024 if start_rss else None,
              "phases": phases, "last_samples": rollout.texts[:4],
              "load_average": Path("/proc/loadavg").read_text().split()[:3]}
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / f"{ns.child}.json").write_text(json.dumps(result, indent=1))


def first_phase_reaching(rewards: list[float], target: float, window: int = 3) -> int | None:
    """The first phase p whose mean reward over phases p-window+1..p reaches the target."""
    for phase in range(window - 1, len(rewards)):
        if statistics.mean(rewards[phase - window + 1 : phase + 1]) >= target:
            return phase
    return None


def report(variants: list[str], target: float, folder: Path):
    """The side-by-side table of the saved runs."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table("variant", "trainable", "phases", "sample s", "rollout fwd s", "learn s",
                  "phase s", "vs full", "peak MiB", "learning peak MiB",
                  f"mean VADER: first / last 3 / phase reaching {target} (mean of 3)",
                  title="What to train (median phase time over phases 2..; fresh process each)")
    rows = {v: json.loads((folder / f"{v}.json").read_text()) for v in variants
            if (folder / f"{v}.json").exists()}
    full_time = None
    if "full" in rows:
        full_time = statistics.median(p["charts/phase_time"] for p in rows["full"]["phases"][1:])
    for name, row in rows.items():
        timed = row["phases"][1:] or row["phases"]
        median = {k: statistics.median(p[k] for p in timed) for k in PARTS}
        rewards = [p["charts/reward_mean"] for p in row["phases"]]
        reach = first_phase_reaching(rewards, target)
        table.add_row(
            name, f"{row['trainable_params'] / 1e6:.2f}M", str(len(rewards)),
            *(f"{median[k]:.1f}" for k in PARTS),
            f"{median['charts/phase_time'] / full_time:.2f}x" if full_time else "-",
            f"{row['peak_rss_mib']:.0f}", f"{row['phase_peak_over_start_mib'] or 0:.0f}",
            f"{rewards[0]:.2f} / {statistics.mean(rewards[-3:]):.2f} / "
            f"{'-' if reach is None else reach}")
    console.print(table)
    for name, row in rows.items():
        console.print(f"[bold]{name}[/bold], last phase's samples:")
        for text in row["last_samples"]:
            console.print("   ", repr(text))


def describe_machine() -> str:
    from minirlhf.runtime.device import describe_cpu

    machine = describe_cpu()
    speed = "fast (AVX512-BF16/AMX)" if machine["fast_bf16"] else "slow (no AVX512-BF16)"
    return f"CPU: {machine['cpu']}; bf16 {speed}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--phases", type=int, default=25)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--report", action="store_true", help="only print the saved runs")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder of the runs' JSON (e.g. a separate one for timing runs)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        return run_variant(ns)
    print(describe_machine(), flush=True)
    if not ns.report:
        for variant in ns.variants:
            command = [sys.executable, __file__, "--child", variant, "--phases", str(ns.phases),
                       "--precision", ns.precision, "--out", str(ns.out)]
            command += ["--threads", str(ns.threads)] if ns.threads else []
            subprocess.run(command, check=True)
    report(ns.variants, ns.target, ns.out)


if __name__ == "__main__":
    main()
